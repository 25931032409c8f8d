"""The calls behind the CLI commands: ``train_teacher``, ``distill`` (one method) and ``compare``
(every method on the same config, seed and budget, with the combined summary and plots). Each
builds a :class:`~kdseq_fast.trainer.Trainer` per run and skips a run that is already complete."""
from __future__ import annotations

import functools
import os
from typing import Sequence

from ._extension import check_cuda_kernels
from .callbacks import ConsoleLogger, TensorBoardLogger
from .config import Config, phase_epochs
from .reports import accuracy_target, steps_to_target
from .run_dir import TrainResult, completed_result, completed_state, is_complete, release_dir_lock
from .run_inputs import DataBundle, build_data, open_teacher
from .runtime import CheckpointError, GracefulStop, setup_run
from .trainer import METHODS, Trainer

__all__ = ["train_teacher", "distill", "compare"]


def _signals_flagged(fn):
    """The whole call holds one GracefulStop: a SIGTERM/SIGINT while a run is being set up (the
    data, the teacher, a comparison's next method) is a flag the next ``Trainer.fit`` honours at
    its start (a checkpoint, then Preempted), not the default action: exit 143 without a word, or
    a traceback, and under torchrun a signal to one rank failed the whole job."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with GracefulStop():
            return fn(*args, **kwargs)
    return wrapper


def _callbacks(cfg: Config, out_dir: str, log, extra=()) -> list:
    cbs = [ConsoleLogger(log)]
    if cfg.train.tensorboard:
        cbs.append(TensorBoardLogger(os.path.join(out_dir, "tb")))
    return cbs + list(extra)


@_signals_flagged
def train_teacher(cfg: Config, out_dir: str, *, resume=False, overwrite=False, quiet=False,
                  log=print, data: DataBundle | None = None, ctx=None) -> TrainResult:
    """Train ``cfg.teacher.arch`` with cross-entropy; writes ``out_dir/teacher.pt``."""
    ctx = ctx or setup_run(cfg.device, seed=cfg.seed, deterministic=cfg.deterministic)
    if resume and ctx.run_on_main(lambda: is_complete(out_dir, "teacher", "ce", cfg)):
        return ctx.run_on_main(lambda: completed_result(out_dir, "teacher.pt", log, "teacher"))
    t = Trainer(cfg, out_dir, role="teacher", resume=resume, overwrite=overwrite, quiet=quiet,
                callbacks=_callbacks(cfg, out_dir, log), log=log, data=data, ctx=ctx)
    return t.fit()


@_signals_flagged
def distill(cfg: Config, out_dir: str, *, method: str | None = None, teacher=None, resume=False,
            overwrite=False, quiet=False, log=print, data: DataBundle | None = None,
            ctx=None) -> TrainResult:
    """Train the student with ``method`` (``ce``, ``kd`` or ``isl``) into ``out_dir``."""
    method = method or cfg.method
    ctx = ctx or setup_run(cfg.device, seed=cfg.seed, deterministic=cfg.deterministic)
    if resume:
        # Rank 0 reads the directory; every rank gets whether the run is done and from which teacher.
        done = ctx.run_on_main(lambda: _finished_teacher(out_dir, method, cfg))
        if done is not None:
            if method != "ce":
                _check_same_teacher(cfg, out_dir, method, teacher, data, done["teacher_fingerprint"], quiet)
            return ctx.run_on_main(lambda: completed_result(out_dir, "student.pt", log, method))
    t = Trainer(cfg, out_dir, method=method, teacher=teacher, resume=resume, overwrite=overwrite,
                quiet=quiet, callbacks=_callbacks(cfg, out_dir, log), log=log, data=data, ctx=ctx)
    return t.fit()


def _finished_teacher(out_dir: str, method: str, cfg: Config) -> dict | None:
    state = completed_state(out_dir, "student", method, cfg)
    return None if state is None else {"teacher_fingerprint": state.get("teacher_fingerprint")}


def _check_same_teacher(cfg: Config, out_dir: str, method: str, teacher, data, stored, quiet) -> None:
    """A finished kd/isl run is returned as it is only for the teacher it was distilled from (an
    unfinished one is held to the same rule when its checkpoint is loaded)."""
    from .scoring import teacher_fingerprint

    data = data or build_data(cfg, progress=False if quiet else None)
    module, _ = open_teacher(cfg, teacher, method, data.num_classes, in_channels=data.in_channels)
    if teacher_fingerprint(module) != stored:
        raise CheckpointError(
            f"cannot resume {out_dir}: the finished run was distilled from other teacher weights than "
            "the teacher given now; pass the original --teacher or start a new --out")


def _claim_compare_dir(out_dir: str, methods: Sequence[str], *, overwrite: bool) -> None:
    """Marks ``out_dir`` as a comparison (run.json, role "compare"), refusing a directory that
    holds a single run: compare writes its summary, metrics and plots over that run's."""
    from .run_dir import RunDirError, acquire_dir_lock, read_identity, run_files_in, write_json

    # Held until compare returns: a run started into this folder meanwhile would take it over.
    acquire_dir_lock(out_dir)
    try:
        other = read_identity(out_dir)
        found = run_files_in(out_dir)
        # A comparison written before run.json marked one: its methods' folders hold runs.
        older = other is None and any(read_identity(os.path.join(out_dir, m)) for m in METHODS)
        if (other is not None and other.get("role") != "compare") or (other is None and found and not older):
            if not overwrite:
                what = (f"a single run (role {other.get('role')}, method {other.get('method')})" if other
                        else f"results that are not a comparison's ({', '.join(sorted(found))}, no run.json)")
                raise RunDirError(f"output directory {out_dir} holds {what}; compare and demo put each method in "
                                  "a folder of its own: choose another --out or pass --overwrite to delete them")
            for name in found:
                os.remove(os.path.join(out_dir, name))
        os.makedirs(out_dir, exist_ok=True)
        write_json({"role": "compare", "methods": list(methods)}, os.path.join(out_dir, "run.json"))
    except BaseException:
        release_dir_lock(out_dir, refused=True)
        raise


def _teacher_on_every_rank(cfg: Config, path: str, data: DataBundle, ctx):
    """The teacher that compare trained, for every rank: only rank 0 wrote teacher.pt, on its own
    disk (README: the output directory need only exist on node 0), so rank 0 reads it and sends
    the weights; the other ranks get a module, rank 0 keeps the path."""
    from .models import get_model
    from .run_inputs import load_teacher

    if ctx.is_main:
        model = load_teacher(cfg, path, data.num_classes, in_channels=data.in_channels)
        ctx.broadcast_object({k: v.cpu() for k, v in model.state_dict().items()})
        return path  # rank 0 records the file in its run's summary and run.json, as before
    model = get_model(cfg.teacher.arch, data.num_classes, image_size=cfg.data.image_size,
                      in_channels=data.in_channels)
    model.load_state_dict(ctx.broadcast_object(None))
    return model.eval().requires_grad_(False)


@_signals_flagged
def compare(cfg: Config, out_dir: str, *, methods: Sequence[str] = METHODS, teacher=None,
            resume=False, overwrite=False, quiet=False, log=print) -> dict:
    """Train the teacher if needed, then each method on the same config, seed and budget.

    Layout: ``out_dir/teacher/`` (when trained here), ``out_dir/<method>/`` per method, and in
    ``out_dir`` the combined ``summary.json``, ``metrics.jsonl`` and comparison plots.
    ``steps_to_target`` uses ``train.target_acc`` or, when null, the kd run's final accuracy.
    """
    methods = list(methods)
    if not methods:
        raise ValueError(f"methods: none given; choose from {', '.join(METHODS)}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods: unknown method {m!r}; valid: {', '.join(METHODS)}")
        if methods.count(m) > 1:
            raise ValueError(f"methods: {m!r} is given twice")
    if "isl" in methods:
        phase_epochs(cfg)  # before the teacher and the baselines train, not after them
    ctx = setup_run(cfg.device, seed=cfg.seed, deterministic=cfg.deterministic)
    if any(m != "ce" for m in methods):
        check_cuda_kernels(ctx.device)  # before the teacher trains, not after
    data = build_data(cfg, progress=False if quiet else None)
    teacher = teacher or cfg.teacher.checkpoint
    if teacher is not None and any(m != "ce" for m in methods):
        # A missing or mismatched teacher fails now, not after the ce student has trained.
        open_teacher(cfg, teacher, "kd", data.num_classes, in_channels=data.in_channels)
    # Inputs checked: now the directory (nothing is written into it before).
    ctx.run_on_main(lambda: _claim_compare_dir(out_dir, methods, overwrite=overwrite))
    try:
        return _compare_into(cfg, out_dir, methods, teacher, data, ctx, resume=resume,
                             overwrite=overwrite, quiet=quiet, log=log)
    finally:
        if ctx.is_main:
            release_dir_lock(out_dir)  # the comparison's folder is free again


def _compare_into(cfg: Config, out_dir: str, methods: list, teacher, data, ctx, *, resume, overwrite,
                  quiet, log) -> dict:
    """compare()'s work in the claimed ``out_dir``: the teacher when none is given, each method,
    then the combined summary, metrics and plots (rank 0)."""
    import copy
    import json

    from . import reports
    from .atomic_files import atomic_write_bytes
    from .run_dir import write_json

    if cfg.train.teacher_cache_dir is None:
        # One teacher-logit cache for the methods of the comparison, not one a method folder.
        cfg = Config(cfg.to_dict())
        cfg.train.teacher_cache_dir = os.path.join(out_dir, "cache")
    teacher_entry = None
    if teacher is None and any(m != "ce" for m in methods):
        res = train_teacher(cfg, os.path.join(out_dir, "teacher"), resume=resume,
                            overwrite=overwrite, quiet=quiet, log=log, data=data, ctx=ctx)
        teacher = res.weights_path
        teacher_entry = res.summary["teacher"]
        if ctx.distributed and ctx.any_true(not os.path.isfile(teacher)):
            teacher = _teacher_on_every_rank(cfg, teacher, data, ctx)  # a node without rank 0's disk
    results = {}
    for m in methods:
        # Same seed for every method: reseed so each starts from the identical initial student.
        ctx = setup_run(cfg.device, seed=cfg.seed, deterministic=cfg.deterministic)
        results[m] = distill(cfg, os.path.join(out_dir, m), method=m,
                             teacher=teacher if m != "ce" else None, resume=resume,
                             overwrite=overwrite, quiet=quiet, log=log, data=data, ctx=ctx)
    summary = {"teacher": teacher_entry or {}, "methods": {}}
    for m, r in results.items():
        if r.summary.get("teacher", {}).get("test_acc") is not None and not teacher_entry:
            summary["teacher"] = dict(r.summary["teacher"])
        summary["methods"][m] = dict(r.summary["methods"][m])
    if teacher_entry is None and teacher is not None:
        summary["teacher"].setdefault("checkpoint", os.path.abspath(os.fspath(teacher)))
    if not ctx.is_main:
        # The combined files and plots come from rank 0; the other ranks only trained.
        return {**summary, "plots": []}
    target = accuracy_target(cfg.train.target_acc)
    if target is None and "kd" in summary["methods"]:
        target = summary["methods"]["kd"]["test_acc"]
    records = {m: reports.read_metrics(os.path.join(out_dir, m, "metrics.jsonl")) for m in results}
    for m, entry in summary["methods"].items():
        hist = [(r["steps"], r["test_acc"]) for r in records[m] if r["test_acc"] is not None]
        entry["target_acc"] = target
        entry["steps_to_target"] = steps_to_target(hist, target)
    if teacher_entry is not None:
        summary["teacher"] = teacher_entry
    # Rewritten whole or not at all: a kill here must not leave a finished comparison without them.
    atomic_write_bytes("".join(json.dumps(r) + "\n" for m in results for r in records[m]).encode(),
                       os.path.join(out_dir, "metrics.jsonl"))
    reports.plot_accuracy(records, os.path.join(out_dir, "accuracy_vs_steps.png"), target=target)
    write_json(summary, os.path.join(out_dir, "summary.json"))
    plots = [os.path.join(out_dir, "accuracy_vs_steps.png")]
    if "isl" in results:
        for name in ("pacing.png", "difficulty_hist.png"):
            src = os.path.join(out_dir, "isl", name)
            if os.path.exists(src):
                plots.append(src)
    summary_out = copy.deepcopy(summary)
    summary_out["plots"] = plots
    return summary_out
