"""Loads the compiled extension (which registers ``torch.ops.kdseq.*``) and reports how it was built."""
from __future__ import annotations

import json

import torch

from ._version import __version__

try:
    from . import _C  # noqa: F401  (importing registers the operators with the dispatcher)
except ImportError as exc:  # pragma: no cover - only hit on a broken install
    raise ImportError(
        "kdseq_fast's compiled extension (kdseq_fast._C) could not be loaded: "
        f"{exc}. Build it against the installed torch with "
        "`pip install --no-build-isolation -e .` (see README.md, 'Install')."
    ) from exc


def build_info() -> dict:
    """How the extension was built: version, CUDA kernels, their archs, OpenMP, CPU ISA, torch."""
    info = json.loads(torch.ops.kdseq.build_info())
    archs = info.pop("cuda_archs")
    return {
        "version": __version__,
        "cuda_compiled": bool(info.pop("cuda_compiled")),
        # TORCH_CUDA_ARCH_LIST separates entries with ';' or spaces.
        "cuda_archs": archs.replace(";", " ").split(),
        "openmp": bool(info.pop("openmp")),
        "torch": torch.__version__,
        **info,
    }
