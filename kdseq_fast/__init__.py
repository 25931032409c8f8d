"""kdseq-fast: curriculum knowledge distillation via instance-level sequence learning (ISL-KD)."""
from ._version import __version__
from .ops import (SCORE_FIELDS, KDLoss, instance_scores, instance_scores_reference, kd_loss,
                  kd_loss_reference)
from ._extension import build_info, check_cuda_kernels

__all__ = [
    "__version__", "build_info", "check_cuda_kernels",
    "kd_loss", "KDLoss", "kd_loss_reference",
    "instance_scores", "instance_scores_reference", "SCORE_FIELDS",
]
