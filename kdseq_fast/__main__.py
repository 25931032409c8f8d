"""``python -m kdseq_fast`` runs the ``kdseq-fast`` command line."""
from .cli import entry

entry()
