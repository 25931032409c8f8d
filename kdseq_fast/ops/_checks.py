"""Argument validation shared by the ops: bad input raises ValueError/TypeError naming the argument."""
from __future__ import annotations

import numbers
from typing import Optional

import torch

TEMPERATURE_RANGE = (1e-6, 1e6)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FP32_MAX = torch.finfo(torch.float32).max
INT64_RANGE = (-2**63, 2**63 - 1)


def _is_number(x) -> bool:
    # Python and NumPy numbers (NumPy registers its scalar types with the numbers ABCs); no bools.
    return isinstance(x, numbers.Real) and not _is_bool(x)


def _is_bool(x) -> bool:
    return isinstance(x, bool) or type(x).__name__ == "bool_"  # numpy.bool_


def _finite(x) -> bool:
    # x - x is 0 for a finite x and NaN for inf or NaN. Unlike math.isfinite it also traces under
    # torch.compile, where a temperature or weight that changed between calls is a symbolic float.
    return (x - x) == 0


def check_logits(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, classes), got shape {tuple(x.shape)}")
    if x.shape[1] < 2:
        raise ValueError(f"{name} needs at least 2 classes, got shape {tuple(x.shape)}")


def check_same_shape(student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"teacher_logits batch size {teacher.shape[0]} does not match student_logits batch size "
            f"{student.shape[0]}")
    if student.shape[1] != teacher.shape[1]:
        raise ValueError(
            f"teacher_logits has {teacher.shape[1]} classes but student_logits has {student.shape[1]}")
    if student.device != teacher.device:
        raise ValueError(
            f"teacher_logits is on {teacher.device} but student_logits is on {student.device}")
    if (student.dtype == torch.float64) != (teacher.dtype == torch.float64):
        raise TypeError("float64 logits must be used for both student_logits and teacher_logits "
                        f"(got {student.dtype} and {teacher.dtype})")


def check_labels(labels, student: torch.Tensor, *, ignore_index: Optional[int] = None,
                 validate: bool = True) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of class indices, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.dim() != 1 or labels.shape[0] != student.shape[0]:
        raise ValueError(
            f"labels must have shape ({student.shape[0]},) to match student_logits, got {tuple(labels.shape)}")
    if labels.device != student.device:
        raise ValueError(f"labels is on {labels.device} but student_logits is on {student.device}")
    # The range check reads the values: one host sync on CUDA. validate=False skips it (the
    # kernels then give an out-of-range row a NaN loss, never an out-of-bounds read); it is also
    # skipped where the values are unknown: while torch.compile traces, inside vmap or grad.
    if validate and labels.numel() and not _values_hidden(labels):
        num_classes = student.shape[1]
        # Compared as int64, as the kernels read them: in its own dtype a uint8 label would meet
        # -100 as 156 and C = 300 as 44.
        y = labels.long()
        outside = (y < 0) | (y >= num_classes)
        if ignore_index is not None:
            outside &= y != ignore_index
        if bool(outside.any()):  # the one host read of a valid batch
            valid = y if ignore_index is None else y[y != ignore_index]
            lo, hi = int(valid.min()), int(valid.max())
            bad = lo if lo < 0 else hi
            extra = "" if ignore_index is None else f" (or ignore_index={ignore_index})"
            raise ValueError(f"labels must be in [0, {num_classes}){extra}; found {bad}")
    return labels


def check_ignore_index(ignore_index) -> int:
    if _is_bool(ignore_index) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    value = int(ignore_index)
    if not INT64_RANGE[0] <= value <= INT64_RANGE[1]:
        raise ValueError(f"ignore_index must fit in int64, got {value}")
    return value


def _as_float(value, name: str) -> float:
    try:
        return float(value)
    except OverflowError:  # a Python int beyond float's range (e.g. 10**400)
        raise ValueError(f"{name} must be finite, got an integer of {len(str(abs(int(value))))} digits, "
                         "beyond float's range") from None


def check_temperature(temperature) -> float:
    if not _is_number(temperature):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    t = _as_float(temperature, "temperature")
    if not _finite(t) or t <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    # The kernels work in fp32: T^2 and 1/T must stay representable.
    if not TEMPERATURE_RANGE[0] <= t <= TEMPERATURE_RANGE[1]:
        raise ValueError(f"temperature must be in [{TEMPERATURE_RANGE[0]:g}, {TEMPERATURE_RANGE[1]:g}] "
                         f"(fp32 kernels), got {temperature}")
    return t


def check_validate(validate) -> bool:
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be True or False, got {type(validate).__name__} {validate!r}")
    return validate


def check_weight(value, name: str) -> float:
    if not _is_number(value):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    v = _as_float(value, name)
    if not _finite(v) or v < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    if v > FP32_MAX:
        raise ValueError(f"{name} must be at most {FP32_MAX:.4g} (fp32 kernels), got {value}")
    return v


def check_reduction(reduction, choices) -> str:
    if not isinstance(reduction, str) or reduction not in choices:
        raise ValueError(f"reduction must be one of {sorted(choices)}, got {reduction!r}")
    return reduction


def _values_hidden(t: torch.Tensor) -> bool:
    """Whether ``t``'s values cannot be read here: torch.compile is tracing, ``t`` is a fake, meta
    or functional tensor, or a torch.func transform (vmap, grad) is active."""
    return (torch.compiler.is_compiling() or _is_fake(t)
            or torch._C._are_functorch_transforms_active())


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return isinstance(t, (FakeTensor, FunctionalTensor)) or t.device.type == "meta"
