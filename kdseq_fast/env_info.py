"""``kdseq-fast info``: what this installation has and whether its kernels run on each visible GPU.

The first thing to look at when a run fails on a new machine, and what a bug report should carry:
the extension's build (CUDA kernels, the archs and code nvcc emitted, OpenMP, CPU ISA), torch and
its CUDA, the data loaders DALI adds, and for every visible GPU whether the kernels can run there
(:func:`kdseq_fast.check_cuda_kernels`'s answer, with its fix when they cannot).
"""
from __future__ import annotations

import platform
import sys

import torch

from ._extension import EXTENSION_ERROR, CudaKernelsUnavailable, build_info, check_cuda_kernels
from ._version import __version__


def collect() -> dict:
    """The report as plain data (``kdseq-fast info --json`` prints it)."""
    from .data.dali_backend import dali_import_error

    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            try:
                check_cuda_kernels(torch.device("cuda", index))
                problem = None
            except CudaKernelsUnavailable as exc:
                problem = str(exc)
            except ImportError:  # the extension did not load: no kernel runs anywhere
                problem = "the compiled extension did not load (above)"
            gpus.append({"device": f"cuda:{index}", "name": props.name,
                         "capability": f"{props.major}.{props.minor}",
                         "memory_gib": round(props.total_memory / 2**30, 1),
                         "multiprocessors": props.multi_processor_count,
                         "kernels_run": problem is None, "problem": problem})
    dali_error = dali_import_error()
    dali = None
    if dali_error is None:
        import nvidia.dali

        dali = getattr(nvidia.dali, "__version__", "unknown version")
    return {
        "kdseq_fast": (build_info() if EXTENSION_ERROR is None else
                       {"version": __version__, "torch": torch.__version__, "load_error": str(EXTENSION_ERROR)}),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch_cuda": torch.version.cuda,
        "gpus": gpus,
        "dali": dali,
        "dali_error": dali_error,
    }


def format_report(info: dict) -> str:
    b = info["kdseq_fast"]
    lines = [
        f"kdseq-fast {b['version']}",
        f"  torch {b['torch']} (CUDA {info['torch_cuda'] or 'none: a CPU-only build'}), "
        f"Python {info['python']}, {info['platform']}",
    ]
    if "load_error" in b:
        lines.append(f"  EXTENSION NOT LOADED: {b['load_error']}")
    else:
        if b["cuda_compiled"]:
            cuda = (f"yes, TORCH_CUDA_ARCH_LIST={';'.join(b['cuda_archs'])} "
                    f"(code {' '.join(b['cuda_targets']) or 'not recorded'})")
        else:
            why = "; ".join(b.get("cuda_off_reasons") or []) or "not recorded by this build"
            cuda = f"no, left out at build time: {why}"
        lines += [
            f"  CUDA kernels: {cuda}",
            f"  CPU kernels: ISA {b.get('cpu_isa', '?')}, OpenMP {'yes' if b['openmp'] else 'no'}, "
            f"compiler {b.get('compiler', '?')}",
        ]
    lines += [
        f"  DALI loader: {info['dali'] if info['dali'] else 'not available (' + str(info['dali_error']) + ')'}",
    ]
    if not info["gpus"]:
        lines.append("  GPUs: none visible (runs use device cpu)")
    for g in info["gpus"]:
        verdict = "the kernels run here" if g["kernels_run"] else "THE KERNELS CANNOT RUN HERE"
        lines.append(f"  {g['device']}: {g['name']}, compute capability {g['capability']}, "
                     f"{g['memory_gib']} GiB, {g['multiprocessors']} SMs: {verdict}")
        if g["problem"]:
            lines.append(f"    {g['problem']}")
    return "\n".join(lines)
