"""The ``auto`` fields of ``cfg.train`` decided for a device: AMP, channels-last, fused optimizer,
compile, CUDA graphs, log interval and evaluation batch. One place, used by the trainer and
reported by the benchmarks (benchmarks/README.md has the measurements behind each default)."""
from __future__ import annotations

import torch

from .config import Config

__all__ = ["resolve_train_settings"]


def _cuda_graphs_setting(t, cuda: bool, distributed: bool, compiled: bool, compile_mode: str, fused: bool,
                         deterministic: bool) -> bool:
    """train.cuda_graphs: auto = on where the captured step applies and was measured (one CUDA
    process, eager modules, fused SGD); true also captures a torch.compile'd step (inductor's
    kernels in the graph; compiled during the warm-up steps); true where it cannot apply is a
    configuration error, named."""
    # reduce-overhead makes inductor capture graphs of its own, which cannot nest in ours.
    ok = cuda and not distributed and fused and not (compiled and compile_mode == "reduce-overhead")
    if t.cuda_graphs == "auto":
        # Bit-exact resume is proven for eager steps; deterministic runs take graphs by choice.
        # A compiled step in a graph is not measured yet: by choice too.
        return ok and not deterministic and not compiled
    if t.cuda_graphs and not ok:
        why = ("a CUDA device" if not cuda else "a single process (not torchrun)" if distributed
               else "train.fused_optimizer on" if not fused
               else "train.compile_mode other than reduce-overhead (which captures graphs itself)")
        raise ValueError(f"config field 'train.cuda_graphs' is true, which needs {why}")
    return bool(t.cuda_graphs)


def resolve_train_settings(cfg: Config, device: torch.device, distributed: bool = False) -> dict:
    """The ``auto`` fields of ``cfg.train`` decided for ``device`` (one place, used by the trainer
    and reported by the benchmarks). CPU defaults were chosen by measurement with
    benchmarks/bench_train.py (see benchmarks/README.md); GPU ones follow the issue's targets and
    stay to be confirmed by measurement where benchmarks/README.md says so."""
    from .amp import resolve_amp

    t = cfg.train
    cuda = device.type == "cuda"

    def pick(value, auto):
        return auto if value == "auto" else value

    return {
        "amp": resolve_amp(t.amp, device),
        # oneDNN's channels-last CPU kernels are deterministic within a process but not across a
        # resume (measured: a killed-and-resumed run drifts from the uninterrupted one), so
        # deterministic CPU runs keep NCHW.
        "channels_last": bool(pick(t.channels_last, cuda or not cfg.deterministic)),
        "fused_optimizer": bool(pick(t.fused_optimizer, True)),
        "compile": bool(pick(t.compile, False)),
        "compile_mode": t.compile_mode,
        "cuda_graphs": _cuda_graphs_setting(t, cuda, distributed, pick(t.compile, False), t.compile_mode,
                                            pick(t.fused_optimizer, True), cfg.deterministic),
        # A host read per step costs nothing on the CPU and keeps non-finite stops exact there.
        "log_every_steps": int(pick(t.log_every_steps, 50 if cuda else 1)),
        "eval_batch_size": int(pick(t.eval_batch_size, max(cfg.optim.batch_size, 1024) if cuda
                                    else cfg.optim.batch_size)),
    }
