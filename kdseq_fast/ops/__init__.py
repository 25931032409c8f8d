"""Fused kernels exposed through the PyTorch dispatcher (``torch.ops.kdseq``)."""
from .kd_loss import KDLoss, kd_loss, kd_loss_reference
from .instance_scores import SCORE_FIELDS, instance_scores, instance_scores_reference

__all__ = [
    "KDLoss", "kd_loss", "kd_loss_reference",
    "SCORE_FIELDS", "instance_scores", "instance_scores_reference",
]
