"""Loads the compiled extension (which registers ``torch.ops.kdseq.*``), reports how it was built,
and tells before the first launch whether its CUDA kernels can run on a given GPU."""
from __future__ import annotations

import functools
import json
import re

import torch

from ._version import __version__


def _missing_extension_message(exc: ImportError) -> str:
    import glob
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    # Python words a missing compiled module as a circular import ("cannot import name '_C' from
    # partially initialized module"); say what is actually wrong.
    built = glob.glob(os.path.join(here, "_C*.so")) + glob.glob(os.path.join(here, "_C*.pyd"))
    what = (f"there is no compiled module (_C*.so) in {here}: the package was not built there"
            if not built else f"{os.path.basename(built[0])} does not load ({exc}): it was built against "
            f"another torch or Python than this one (torch {torch.__version__})")
    return (f"kdseq_fast's compiled extension (kdseq_fast._C) could not be loaded: {what}. Build it "
            "against the installed torch with `pip install --no-build-isolation -e .` (see README.md, "
            "'Install').")


class ExtensionNotLoaded(ImportError):
    """kdseq_fast._C did not load (not built, or built against another torch or Python); the
    message says which and how to rebuild."""


# Why kdseq_fast._C did not load, or None. The module itself always imports, so that `kdseq-fast
# info` can report a broken build; the ops call require_extension() when they are imported.
EXTENSION_ERROR: ExtensionNotLoaded | None = None
try:
    from . import _C  # noqa: F401  (importing registers the operators with the dispatcher)
except ImportError as _exc:
    EXTENSION_ERROR = ExtensionNotLoaded(_missing_extension_message(_exc))
    EXTENSION_ERROR.__cause__ = _exc


def require_extension() -> None:
    """Raise :class:`ExtensionNotLoaded` (an ImportError saying what is wrong and how to rebuild)
    when the compiled extension did not load."""
    if EXTENSION_ERROR is not None:  # a fresh exception each time: tracebacks do not pile up
        raise ExtensionNotLoaded(str(EXTENSION_ERROR)) from EXTENSION_ERROR.__cause__


# setup.py's want_cuda() codes for why a build left the CUDA kernels out.
CUDA_OFF_REASONS = {
    "env_off": "KDSEQ_CUDA=0 was set",
    "cpu_torch": "the torch it was built against is a CPU-only build",
    "no_toolkit": "no CUDA toolkit was found (CUDA_HOME)",
    "no_nvcc": "no working nvcc was found in the CUDA toolkit",
    "nvcc_mismatch": "nvcc's CUDA major version did not match torch's",
}


def build_info() -> dict:
    """How the extension was built: version, CUDA kernels (and, when they were left out, why),
    their archs, OpenMP, CPU ISA, torch."""
    require_extension()
    info = json.loads(torch.ops.kdseq.build_info())
    archs = info.pop("cuda_archs")
    off = [c for c in info.pop("cuda_off", "").split(",") if c]
    return {
        "version": __version__,
        "cuda_compiled": bool(info.pop("cuda_compiled")),
        # Empty when the kernels were built (or the build predates the record).
        "cuda_off_reasons": [CUDA_OFF_REASONS.get(c, c) for c in off],
        # TORCH_CUDA_ARCH_LIST separates entries with ';' or spaces.
        "cuda_archs": archs.replace(";", " ").split(),
        # What nvcc emitted for them, in torch.cuda.get_arch_list()'s names: "sm_80" machine code,
        # "compute_90" PTX that the driver compiles for newer GPUs.
        "cuda_targets": [t for t in info.pop("cuda_targets", "").split(",") if t],
        "openmp": bool(info.pop("openmp")),
        "torch": torch.__version__,
        **info,
    }


_TARGET = re.compile(r"(sm|compute)_(\d+)(\d)([af]?)")


def targets_run_on(capability: tuple[int, int], targets: list[str]) -> bool:
    """Whether code built for ``targets`` (``build_info()["cuda_targets"]``) runs on a GPU of
    compute capability ``capability`` (``torch.cuda.get_device_capability()``).

    CUDA's rules: machine code for X.Y runs on X.Z for Z >= Y (same major); PTX for X.Y is
    compiled by the driver for any X'.Y' >= X.Y; code for an arch-specific target ("sm_90a") runs
    on exactly that arch, and a family target ("sm_100f") within its major only. A target this
    function cannot read counts as runnable, so an unfamiliar name never blocks a run.
    """
    major, minor = capability
    for target in targets:
        m = _TARGET.fullmatch(target)
        if m is None:
            return True
        kind, t_major, t_minor, suffix = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if suffix == "a":
            ok = (t_major, t_minor) == (major, minor)
        elif kind == "sm" or suffix == "f":
            ok = t_major == major and t_minor <= minor
        else:
            ok = (t_major, t_minor) <= (major, minor)
        if ok:
            return True
    return False


@functools.lru_cache(maxsize=None)
def _kernels_problem(index: int) -> str | None:
    info = build_info()
    name = torch.cuda.get_device_name(index)
    if not info["cuda_compiled"]:
        why = "; ".join(info.get("cuda_off_reasons") or [])
        how = ("Rebuild it without KDSEQ_CUDA=0" if CUDA_OFF_REASONS["env_off"] in info.get("cuda_off_reasons", [])
               else f"Rebuild it with a CUDA toolkit whose major version matches torch's CUDA {torch.version.cuda}")
        return (f"kdseq_fast was built without its CUDA kernels{f' ({why})' if why else ''}, so kd_loss and "
                f"instance_scores cannot run on cuda:{index} ({name}). {how} (CUDA_HOME=<toolkit> pip install "
                "--no-build-isolation <path to kdseq-fast>; the build prints why it left CUDA out), or use "
                "device 'cpu'.")
    capability = torch.cuda.get_device_capability(index)
    if not info["cuda_targets"] or targets_run_on(capability, info["cuda_targets"]):
        return None
    cc = f"{capability[0]}.{capability[1]}"
    return (f"kdseq_fast's CUDA kernels cannot run on cuda:{index} ({name}, compute capability {cc}): the "
            f"extension was built for TORCH_CUDA_ARCH_LIST=\"{';'.join(info['cuda_archs'])}\" "
            f"(code {' '.join(info['cuda_targets'])}). Rebuild it for this GPU, e.g. "
            f"TORCH_CUDA_ARCH_LIST=\"{cc}\" pip install --no-build-isolation <path to kdseq-fast>, "
            "or use device 'cpu'.")


class CudaKernelsUnavailable(RuntimeError):
    """The extension's CUDA kernels cannot run on the requested GPU (the message says why and how
    to fix it)."""


def check_cuda_kernels(device) -> None:
    """Raise :class:`CudaKernelsUnavailable` (a RuntimeError), saying how to fix it, when
    ``kd_loss``/``instance_scores`` cannot run on ``device``: the extension was built without CUDA
    kernels, or for other GPU architectures. A no-op for CPU devices; the answer is cached per GPU,
    and asking never waits for the GPU. Runs ask it before any work (``Trainer``, ``compare``,
    ``score_dataset``); a direct op call on such a GPU fails at its launch with the same advice."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    # Before any CUDA query: without a GPU those raise torch's bare "no NVIDIA driver".
    if not torch.cuda.is_available():
        raise CudaKernelsUnavailable(
            f"no CUDA device is available to this process for {device} (torch {torch.__version__}, "
            f"CUDA {torch.version.cuda or 'none'}: torch.cuda.is_available() is False); use device 'cpu'")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise CudaKernelsUnavailable(f"{device} does not exist: this process sees {count} GPU(s), "
                                     f"cuda:0 to cuda:{count - 1}")
    problem = _kernels_problem(device.index if device.index is not None else torch.cuda.current_device())
    if problem is not None:
        raise CudaKernelsUnavailable(problem)
