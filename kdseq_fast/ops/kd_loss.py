"""Fused temperature-scaled knowledge-distillation loss.

    loss_i = kd_weight * T^2 * KL(softmax(t_i / T) || softmax(s_i / T)) + ce_weight * CE(s_i, y_i)

One kernel (``torch.ops.kdseq.kd_loss``; CPU and CUDA) gets each row's loss from one read of the
student and teacher rows and writes the student gradient once: the CPU keeps the exponentials of
that read in a row buffer, the GPU keeps the row in registers (a warp, a CTA or a thread-block
cluster per row). Backward (a C++ autograd kernel) only scales the stored gradient by
``grad_output`` (on CUDA in place, returning at once for a factor of 1).
``kd_loss_reference`` is the same math in plain PyTorch, used by the tests and as documentation.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._extension import require_extension
from ._checks import (check_ignore_index, check_labels, check_logits, check_reduction,
                      check_same_shape, check_temperature, check_validate, check_weight)

require_extension()  # importing the compiled module registers torch.ops.kdseq

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


def _loss_dtype(student: torch.Tensor) -> torch.dtype:
    return torch.float64 if student.dtype == torch.float64 else torch.float32


@torch.library.register_fake("kdseq::kd_loss")
def _kd_loss_fake(student, teacher, labels, temperature, kd_weight, ce_weight, reduction,
                  ignore_index, compute_grad):
    dtype = _loss_dtype(student)
    loss = student.new_empty((student.shape[0],) if reduction == 0 else (), dtype=dtype)
    grad = student.new_empty(student.shape if compute_grad else (0,))
    return loss, grad


# Autograd is registered in C++ (csrc/ops.cpp, KDLossFunction): backward hands back the gradient the
# forward kernel wrote, scaled by grad_output. A Python torch.library.register_autograd wrapper cost
# more per training step than the whole kernel at CIFAR sizes.


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            labels: Optional[torch.Tensor] = None, *, temperature: float = 4.0,
            kd_weight: float = 1.0, ce_weight: float = 0.0, reduction: str = "mean",
            ignore_index: int = -100, validate: bool = True) -> torch.Tensor:
    """Temperature-scaled KD loss (plus optional cross-entropy), fused forward and backward.

    Args:
        student_logits: (B, C) float32/float16/bfloat16 (float64 for gradcheck). Receives the
            gradient, in its own dtype.
        teacher_logits: (B, C), any of those float dtypes; never receives a gradient.
        labels: (B,) integer class indices; required when ``ce_weight > 0``. Rows whose label is
            ``ignore_index`` contribute nothing (neither loss nor gradient).
        temperature: T > 0. The KD term is ``T^2 * KL(softmax(t/T) || softmax(s/T))``.
        kd_weight, ce_weight: weights of the KD and CE terms (>= 0).
        reduction: ``"mean"`` (sum over non-ignored rows / their count; 0 when none remain),
            ``"sum"`` or ``"none"`` (a (B,) vector).
        validate: check that every label lies in ``[0, C)`` or is ``ignore_index`` (a
            ``ValueError`` otherwise). On CUDA this reads the labels: one host synchronization.
            ``validate=False`` skips it, so the call never waits for the GPU; a row whose label is
            out of range then gets a NaN loss and a NaN gradient row (never an out-of-bounds
            read). Training loops validate a dataset's labels once and pass ``False``.

    Returns:
        float32 loss (float64 for float64 inputs): a scalar, or (B,) for ``reduction="none"``.
    """
    check_logits(student_logits, "student_logits")
    check_logits(teacher_logits, "teacher_logits")
    check_same_shape(student_logits, teacher_logits)
    t = check_temperature(temperature)
    kdw = check_weight(kd_weight, "kd_weight")
    cew = check_weight(ce_weight, "ce_weight")
    check_reduction(reduction, REDUCTIONS)
    ignore_index = check_ignore_index(ignore_index)
    check_validate(validate)
    if labels is None:
        if cew > 0:
            raise ValueError("labels are required when ce_weight > 0")
    else:
        check_labels(labels, student_logits, ignore_index=ignore_index, validate=validate)
    compute_grad = torch.is_grad_enabled() and student_logits.requires_grad
    # The teacher never receives a gradient; detaching keeps autograd from tracking it.
    loss, _ = torch.ops.kdseq.kd_loss(student_logits, teacher_logits.detach(), labels, t, kdw, cew,
                                      REDUCTIONS[reduction], ignore_index, compute_grad)
    return loss


def kd_loss_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: Optional[torch.Tensor] = None, *, temperature: float = 4.0,
                      kd_weight: float = 1.0, ce_weight: float = 0.0, reduction: str = "mean",
                      ignore_index: int = -100, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The same loss in plain PyTorch, computed in ``dtype`` (float64 by default)."""
    s = student_logits.to(dtype)
    t = teacher_logits.detach().to(dtype)
    T = float(temperature)
    log_ps = F.log_softmax(s / T, dim=1)
    log_pt = F.log_softmax(t / T, dim=1)
    pt = log_pt.exp()
    # pt == 0 (masked teacher class) contributes 0, not 0 * (-inf - x) = nan; a NaN pt stays NaN.
    kl_terms = torch.where(pt == 0, torch.zeros_like(pt), pt * (log_pt - log_ps))
    rows = kd_weight * T * T * kl_terms.sum(1)
    if labels is not None:
        keep = labels != ignore_index
        if ce_weight:
            safe = torch.where(keep, labels, torch.zeros_like(labels)).long()
            ce = torch.logsumexp(s, 1) - s.gather(1, safe[:, None]).squeeze(1)
            rows = rows + ce_weight * ce
        rows = torch.where(keep, rows, torch.zeros_like(rows))
        n = int(keep.sum())
    else:
        n = s.shape[0]
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / n if n > 0 else rows.sum() * 0


class KDLoss(nn.Module):
    """``nn.Module`` form of :func:`kd_loss` (mdistiller style: a loss is a small object).

    Example::

        criterion = KDLoss(temperature=4.0, kd_weight=0.9, ce_weight=0.1)
        loss = criterion(student(x), teacher_logits, y)
    """

    def __init__(self, temperature: float = 4.0, kd_weight: float = 1.0, ce_weight: float = 0.0,
                 reduction: str = "mean", ignore_index: int = -100, validate: bool = True):
        super().__init__()
        self.temperature = check_temperature(temperature)
        self.kd_weight = check_weight(kd_weight, "kd_weight")
        self.ce_weight = check_weight(ce_weight, "ce_weight")
        self.reduction = check_reduction(reduction, REDUCTIONS)
        self.ignore_index = check_ignore_index(ignore_index)
        self.validate = check_validate(validate)

    def forward(self, student_logits, teacher_logits, labels=None):
        return kd_loss(student_logits, teacher_logits, labels, temperature=self.temperature,
                       kd_weight=self.kd_weight, ce_weight=self.ce_weight, reduction=self.reduction,
                       ignore_index=self.ignore_index, validate=self.validate)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, kd_weight={self.kd_weight}, "
                f"ce_weight={self.ce_weight}, reduction={self.reduction!r}, "
                f"ignore_index={self.ignore_index}, validate={self.validate}")
