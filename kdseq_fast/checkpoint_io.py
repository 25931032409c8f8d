"""Loading model weights from the checkpoint formats in the wild, and crash-safe saving.

``load_model_weights`` accepts a plain state dict or the usual wrappers — RepDistiller's
``{"model": sd}``, ``{"state_dict": sd}``, this project's ``{"student": sd}`` / ``{"model_state":
sd}`` — with or without DDP's ``module.`` (or ``torch.compile``'s ``_orig_mod.``) key prefix.
Mismatches raise ``ValueError`` listing the missing/unexpected keys and shape conflicts instead of
PyTorch's RuntimeError, so a 10-class checkpoint loaded into a 100-class model says exactly that.
"""
from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from .atomic_files import atomic_write

__all__ = ["load_model_weights", "extract_state_dict", "fitting_architectures", "fit_hint", "atomic_save"]

# Checked in this order; the first key holding a tensor mapping wins.
_WRAPPER_KEYS = ("model", "state_dict", "student", "model_state", "net", "module")
_PREFIXES = ("module.", "_orig_mod.")
_MAX_LISTED = 10


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Unwrap a loaded checkpoint object to a flat ``{name: tensor}`` dict without prefixes."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    sd = None
    if _is_state_dict(obj):
        sd = obj
    elif isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module):
                inner = inner.state_dict()
            if _is_state_dict(inner):
                sd = inner
                break
    if sd is None:
        keys = list(obj.keys())[:20] if isinstance(obj, Mapping) else []
        raise ValueError(
            "checkpoint holds no model state dict: expected a {name: tensor} mapping or one under "
            f"{', '.join(repr(k) for k in _WRAPPER_KEYS)}; got {type(obj).__name__}"
            + (f" with keys {keys}" if keys else ""))
    out = {}
    for k, v in sd.items():
        # Strip repeatedly: a compiled model wrapped in DDP has both prefixes.
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _load_path(path: str | os.PathLike, weights_only: bool) -> Any:
    from .runtime import _MAGIC, load_checkpoint

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    with open(path, "rb") as fh:
        head = fh.read(max(len(_MAGIC), 4))
    if head[:len(_MAGIC)] == _MAGIC:
        # A run's own checkpoint.pt (checksummed header): its "model" entry holds the weights.
        return load_checkpoint(path)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        # torch.save writes a zip archive (or, before torch 1.6, a pickle): anything else is
        # another kind of file (torch's unpickler would call it unsafe Python objects).
        raise ValueError(f"{path} is not a PyTorch checkpoint (torch.save writes a zip archive or a pickle; "
                         f"this file starts with {head[:4]!r})")
    if not weights_only:
        return torch.load(path, map_location="cpu", weights_only=False)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise ValueError(f"{path} is not a PyTorch checkpoint ({exc})") from None
        # Old checkpoints (RepDistiller saves argparse/optimizer objects) are not loadable with
        # weights_only; refuse rather than unpickle arbitrary code silently.
        # torch's text is a page of advice; keep the unpickler's reason (its first sentence).
        detail = str(exc).split("WeightsUnpickler error:", 1)[-1].strip()
        detail = re.split(r"\.\s|\n\n", detail, maxsplit=1)[0].strip()
        raise ValueError(
            f"{path} holds Python objects besides tensors, which torch.load(weights_only=True) refuses "
            f"to unpickle ({detail}). Re-save just its state dict (torch.save(ckpt['model'], ...)) or, "
            "from Python and only for a file you trust, call load_model_weights(..., "
            "weights_only=False)") from None
    except Exception as exc:  # noqa: BLE001 - a zip/pickle reader error: not a torch file
        raise ValueError(f"{path} is not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from None


def fitting_architectures(path: str | os.PathLike, num_classes: int, *, in_channels: int = 3,
                          image_size: int = 32) -> list[str]:
    """The model zoo's architectures whose state dict ``path`` matches key for key and shape for
    shape (for an error that says which ``arch`` a checkpoint is); [] when it cannot be read."""
    from .models import MODEL_REGISTRY, get_model

    try:
        sd = extract_state_dict(_load_path(path, weights_only=True))
    except (ValueError, OSError, TypeError, KeyError):
        return []
    shapes = {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}
    fits = []
    for name in MODEL_REGISTRY:
        own = get_model(name, num_classes, image_size=image_size, in_channels=in_channels).state_dict()
        if own.keys() == shapes.keys() and all(tuple(v.shape) == shapes[k] for k, v in own.items()):
            fits.append(name)
    return fits


def fit_hint(path: str | os.PathLike, num_classes: int, option: str, *, in_channels: int = 3,
             image_size: int = 32) -> str:
    """The end of a "does not fit" error: ``". It fits A, B: <option>A"`` naming the zoo
    architectures ``path`` fits (``option``, e.g. ``"--arch "``, is how the caller's user picks
    one), or ""."""
    fits = fitting_architectures(path, num_classes, in_channels=in_channels, image_size=image_size)
    return f". It fits {', '.join(fits)}: {option}{fits[0]}" if fits else ""


def _fmt(items: list[str]) -> str:
    more = f" ... (+{len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def load_model_weights(model: nn.Module, path_or_state: Any, *, strict: bool = True,
                       weights_only: bool = True) -> dict[str, list[str]]:
    """Load weights into ``model`` in place.

    ``path_or_state``: a file path, a state dict, a checkpoint dict wrapping one, or a module.
    ``strict=True``: every key must match with the same shape, otherwise ``ValueError``.
    ``strict=False``: shape conflicts still raise (they can never be loaded meaningfully);
    missing/unexpected keys are reported in the returned ``{"missing": [...], "unexpected": [...]}``.
    ``weights_only``: passed to ``torch.load`` for paths; only disable it for files you trust.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(path_or_state, (str, os.PathLike)):
        source = f"checkpoint {os.fspath(path_or_state)}"
        obj = _load_path(path_or_state, weights_only)
    else:
        source = "state dict"
        obj = path_or_state
    sd = extract_state_dict(obj)
    target = model
    # Loading into a DDP / compiled wrapper: address the inner module so keys line up.
    while hasattr(target, "module") and isinstance(target.module, nn.Module) and \
            type(target).__name__ in ("DistributedDataParallel", "DataParallel"):
        target = target.module
    if hasattr(target, "_orig_mod") and isinstance(target._orig_mod, nn.Module):
        target = target._orig_mod
    own = target.state_dict()
    missing = sorted(k for k in own if k not in sd)
    unexpected = sorted(k for k in sd if k not in own)
    shape_bad = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                       for k in own if k in sd and sd[k].shape != own[k].shape)
    problems = []
    if shape_bad:
        problems.append(f"shape mismatches: {_fmt(shape_bad)}")
    if strict and missing:
        problems.append(f"missing keys: {_fmt(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys: {_fmt(unexpected)}")
    if problems:
        arch = getattr(target, "arch_name", type(target).__name__)
        raise ValueError(f"{source} does not match model {arch}: " + "; ".join(problems))
    target.load_state_dict({k: v for k, v in sd.items() if k in own}, strict=False)
    return {"missing": missing, "unexpected": unexpected}


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` that never leaves a truncated file at ``path`` (creating its directory):
    :func:`kdseq_fast.atomic_files.atomic_write`'s temp file, fsync and rename."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda fh: torch.save(obj, fh))
