"""Per-instance difficulty measures from one read of each logit row.

Columns (``SCORE_FIELDS``), all at T = 1 except ``kd``:
``ce = logsumexp(s) - s[y]``; ``kd = T^2 KL(softmax(t/T) || softmax(s/T))`` (0 without a teacher);
``p_true = softmax(s)[y]``; ``margin = s[y] - max_{j != y} s[j]``;
``entropy = -sum softmax(s) log softmax(s)``; ``correct = 1.0`` where ``argmax(s) == y`` (the first
maximum wins, as ``torch.argmax``) else ``0.0``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._extension import require_extension
from ._checks import (check_labels, check_logits, check_same_shape, check_temperature,
                      check_validate)

require_extension()  # importing the compiled module registers torch.ops.kdseq

SCORE_FIELDS = ("ce", "kd", "p_true", "margin", "entropy", "correct")


@torch.library.register_fake("kdseq::instance_scores")
def _instance_scores_fake(student, labels, teacher, temperature):
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    return student.new_empty((student.shape[0], len(SCORE_FIELDS)), dtype=dtype)


def instance_scores(student_logits: torch.Tensor, labels: torch.Tensor,
                    teacher_logits: Optional[torch.Tensor] = None, *,
                    temperature: float = 4.0, validate: bool = True) -> torch.Tensor:
    """(B, 6) float32 matrix of the ``SCORE_FIELDS`` for every row (no gradient).

    Inputs may be float32/float16/bfloat16 (float64 gives a float64 result); accumulation is fp32.
    ``validate=True`` checks that labels lie in ``[0, C)`` (a host read on CUDA, ``ValueError``
    otherwise); with ``validate=False`` the call never synchronizes and a row with an out-of-range
    label gets NaN scores. On the CPU, ``temperature`` 1, 2 or 4 with a teacher takes a faster loop
    (exp(s - m) from exp((s - m) / T) by squaring: two exponentials an element instead of three),
    within a few fp32 ulp of the general one.
    """
    check_logits(student_logits, "student_logits")
    check_labels(labels, student_logits, validate=check_validate(validate))
    if teacher_logits is not None:
        check_logits(teacher_logits, "teacher_logits")
        check_same_shape(student_logits, teacher_logits)
    t = check_temperature(temperature)
    with torch.no_grad():
        return torch.ops.kdseq.instance_scores(
            student_logits.detach(), labels,
            None if teacher_logits is None else teacher_logits.detach(), t)


def instance_scores_reference(student_logits: torch.Tensor, labels: torch.Tensor,
                              teacher_logits: Optional[torch.Tensor] = None, *,
                              temperature: float = 4.0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The six measures as separate plain-PyTorch reductions, in ``dtype`` (float64 by default)."""
    s = student_logits.detach().to(dtype)
    y = labels.long()
    # log_softmax, not logsumexp: a +inf logit makes the row NaN (inf - inf), as in the kernels
    # (torch.logsumexp special-cases it to inf).
    logp = F.log_softmax(s, 1)
    s_y = s.gather(1, y[:, None]).squeeze(1)
    ce = -logp.gather(1, y[:, None]).squeeze(1)
    p_true = torch.exp(-ce)
    # The maxima behind margin and correct skip NaN entries (README: unlike torch.argmax).
    no_nan = torch.where(torch.isnan(s), torch.full_like(s, float("-inf")), s)
    others = no_nan.scatter(1, y[:, None], float("-inf"))
    margin = s_y - others.max(1).values
    p = logp.exp()
    entropy = -torch.where(p == 0, torch.zeros_like(p), p * logp).sum(1)
    # The first maximum among the non-NaN entries; a row of NaN only has none (not correct).
    is_max = (no_nan == no_nan.max(1, keepdim=True).values) & ~torch.isnan(s)
    correct = (is_max.any(1) & (is_max.to(torch.uint8).argmax(1) == y)).to(dtype)
    if teacher_logits is not None:
        T = float(temperature)
        log_pt = F.log_softmax(teacher_logits.detach().to(dtype) / T, 1)
        log_ps = F.log_softmax(s / T, 1)
        pt = log_pt.exp()
        kd = T * T * torch.where(pt == 0, torch.zeros_like(pt), pt * (log_pt - log_ps)).sum(1)
    else:
        kd = torch.zeros_like(ce)
    return torch.stack([ce, kd, p_true, margin, entropy, correct], 1)
