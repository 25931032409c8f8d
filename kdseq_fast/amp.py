"""One mixed-precision vocabulary for the config, the trainer, scoring and the benchmarks.

``amp`` is one of ``"auto"``, ``"none"``, ``"bf16"``, ``"fp16"``; ``None`` means ``"auto"`` and the
torch dtypes ``torch.bfloat16`` / ``torch.float16`` (and ``torch.float32``, ``False``) are accepted
as their names, so a caller holding a dtype cannot trip a consumer that expects a name.
``"auto"`` is bf16 on GPUs that support it (compute capability 8.0+) and fp32 everywhere else:
CPUs without native bf16 run autocast slower than fp32, and fp16 needs loss scaling.
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["AMP_CHOICES", "resolve_amp", "amp_dtype", "autocast"]

AMP_CHOICES = ("auto", "none", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_ALIASES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "none", False: "none",
            None: "auto"}


def resolve_amp(amp, device) -> str:
    """``"none"``, ``"bf16"`` or ``"fp16"`` for ``amp`` on ``device`` (``"auto"`` decided here)."""
    name = _ALIASES.get(amp, amp) if not isinstance(amp, str) else amp
    if name not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)} (or None, torch.bfloat16, "
                         f"torch.float16), got {amp!r}")
    device = torch.device(device)
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported(
                including_emulation=False):
            return "bf16"
        return "none"
    return name


def amp_dtype(amp: str):
    """The autocast dtype of a resolved ``amp`` name, None for ``"none"``."""
    return _DTYPES.get(amp)


def autocast(device, amp):
    """``torch.autocast`` for ``amp`` on ``device`` (a no-op context for fp32)."""
    device = torch.device(device)
    dtype = amp_dtype(resolve_amp(amp, device))
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
