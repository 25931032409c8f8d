"""Argument checks shared by the public API (curriculum, loader, datasets, scoring): the value
as the type it must be, or a ValueError naming the argument (never a silent ``int()`` truncation
or an error from deep inside numpy or torch)."""
from __future__ import annotations

import numpy as np

__all__ = ["check_int", "check_bool", "host_array"]


def check_int(name: str, value, minimum: int | None = None) -> int:
    """``value`` as an int: a Python or numpy integer (not a bool), at least ``minimum``.

    A float, string or bool where a count, seed or index is meant raises a ValueError naming the
    argument instead of being truncated by ``int()``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or \
            (minimum is not None and value < minimum):
        what = {0: "a non-negative integer", 1: "a positive integer"}.get(
            minimum, "an integer" if minimum is None else f"an integer >= {minimum}")
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def host_array(x, name: str):
    """A torch tensor (duck-typed: importing this module does not import torch) detached and copied to a
    host numpy array; anything else is returned unchanged. A tensor without data (on the "meta"
    device) is refused by name rather than failing deep inside torch."""
    if hasattr(x, "detach") and hasattr(x, "device"):
        if getattr(x.device, "type", None) == "meta":
            raise ValueError(f"{name} is a tensor on the meta device (a shape without data); "
                             "pass a tensor that holds values")
        x = x.detach().cpu().numpy()
    return x
