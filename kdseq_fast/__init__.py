"""kdseq-fast: curriculum knowledge distillation via instance-level sequence learning (ISL-KD)."""
from ._version import __version__
from ._extension import EXTENSION_ERROR, build_info, check_cuda_kernels

__all__ = [
    "__version__", "build_info", "check_cuda_kernels",
    "kd_loss", "KDLoss", "kd_loss_reference",
    "instance_scores", "instance_scores_reference", "SCORE_FIELDS",
]

if EXTENSION_ERROR is None:
    from .ops import (SCORE_FIELDS, KDLoss, instance_scores, instance_scores_reference, kd_loss,
                      kd_loss_reference)
else:
    # A broken build still imports, so that `kdseq-fast info` can report it; the ops (and every
    # module that uses them) raise the loader's message: what is wrong, how to rebuild.
    def __getattr__(name: str):
        if name in __all__:
            raise ImportError(str(EXTENSION_ERROR)) from EXTENSION_ERROR
        raise AttributeError(f"module 'kdseq_fast' has no attribute {name!r}")
