"""Data loading for curriculum training: the trainer sets the order, the loader delivers it."""
from .loader import CurriculumLoader

__all__ = ["CurriculumLoader"]
