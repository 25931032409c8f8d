"""Command line: ``kdseq-fast`` / ``python -m kdseq_fast``.

Subcommands: ``train-teacher``, ``distill``, ``compare``, ``score``, ``demo``, ``info``. All but
``info`` take ``--config``, ``--set key=value`` (repeatable), ``--seed``, ``--device``, ``--out``,
``--quiet``; those that train also take ``--resume`` or ``--overwrite``.
Exit status: 0 on success and after a SIGTERM/SIGINT checkpoint; 2 for bad input (config,
paths, checkpoints, a different run in ``--out`` or one in use); 3 when training hit a non-finite
loss or weights.

Multi-process: ``torchrun --nproc_per_node N -m kdseq_fast distill ...`` (or
``python -m torch.distributed.run``) runs the same command on N ranks with DDP; only rank 0
prints progress, errors are printed by the rank that hit them, prefixed with its rank.
"""
from __future__ import annotations

import argparse
import os
import sys

from .config import find_config  # re-exported: what --config accepts

__all__ = ["main", "build_parser", "find_config"]


def _nonempty_path(text: str) -> str:
    if not text.strip():  # "" would train into the current directory
        raise argparse.ArgumentTypeError("must be a non-empty path")
    return text


def _common(p: argparse.ArgumentParser, *, out_required: bool = True, run_flags: bool = True) -> None:
    p.add_argument("--config", help="YAML recipe (path or packaged name such as digits_quick)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=0.1 (repeatable)")
    p.add_argument("--seed", type=int, help="shorthand for --set seed=N")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N (shorthand for --set device=...)")
    p.add_argument("--out", required=out_required, type=_nonempty_path, help="output directory")
    if run_flags:  # commands that train into --out
        start = p.add_mutually_exclusive_group()
        start.add_argument("--resume", action="store_true",
                           help="continue the run in --out from its last good checkpoint")
        start.add_argument("--overwrite", action="store_true",
                           help="start over even if --out already holds a run")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--dist-backend", choices=("nccl", "gloo", "mpi", "ucc"),
                   help="under torchrun: process-group backend (default nccl on GPU, gloo on "
                        "CPU; also KDSEQ_DIST_BACKEND)")
    p.add_argument("--dist-timeout", type=float, metavar="SECONDS",
                   help="under torchrun: a collective waiting longer fails the job instead of "
                        "hanging (default 1800; also KDSEQ_DIST_TIMEOUT)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdseq-fast",
        description="Curriculum knowledge distillation via instance-level sequence learning.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train-teacher", help="train cfg.teacher.arch with cross-entropy")
    _common(p)

    p = sub.add_parser("distill", help="train a student with ce, kd or isl")
    _common(p)
    p.add_argument("--method", choices=("ce", "kd", "isl"), help="default: cfg.method")
    p.add_argument("--teacher", help="teacher checkpoint (default: teacher.checkpoint)")

    p = sub.add_parser("compare", help="run several methods on one config; one summary + plots")
    _common(p)
    p.add_argument("--methods", default="ce,kd,isl", help="comma-separated (default ce,kd,isl)")
    p.add_argument("--teacher", help="teacher checkpoint (default: teacher.checkpoint; when neither is "
                                     "given, one is trained into OUT/teacher)")

    p = sub.add_parser("score", help="score a dataset split with a checkpoint -> (N, 6) matrix (without "
                                     "--config, a run's checkpoint brings its run's config.yaml)")
    _common(p, run_flags=False)
    p.add_argument("--checkpoint", required=True,
                   help="weights to score with (student.pt, teacher.pt, checkpoint.pt, RepDistiller)")
    p.add_argument("--arch", help="architecture of --checkpoint (default: student.arch, or teacher.arch "
                                  "for a teacher run's weights)")
    p.add_argument("--teacher", help="teacher checkpoint for the kd column (optional)")
    p.add_argument("--split", default="train", choices=("train", "test"))

    p = sub.add_parser("demo", help="teacher + ce/kd/isl students on the offline digits recipe")
    _common(p)

    p = sub.add_parser("info", help="the build, torch, DALI, and whether the kernels run on each visible GPU")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _cmd_info(args, log) -> int:
    import json

    from .env_info import collect, format_report

    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_report(info), flush=True)
    return 0


def _load_cfg(args, default_config: str | None = None, methods=None):
    from .config import load_config

    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.device is not None:
        overrides.append(f"device={args.device}")
    path = args.config or default_config
    if path is None:
        # Not an error (every field has a default), but rarely what was meant: say what runs.
        from .config import DEFAULTS as d

        if _rank() == 0:
            print(f"note: no --config; using the built-in defaults ({d['data']['name']}, {d['teacher']['arch']} -> "
                  f"{d['student']['arch']}, {d['optim']['epochs']} epochs) with the --set overrides; recipes are in "
                  "configs/ (e.g. --config digits_quick)", file=sys.stderr, flush=True)
    return load_config(find_config(path) if path else None, overrides, methods=methods)


def _cmd_train_teacher(args, log) -> int:
    from .runs import train_teacher

    cfg = _load_cfg(args, methods=())  # a teacher trains plainly: the curriculum is never read
    res = train_teacher(cfg, args.out, resume=args.resume, overwrite=args.overwrite,
                        quiet=args.quiet, log=log)
    t = res.summary["teacher"]
    log(f"teacher {t['arch']}: test acc {t['test_acc']:.4f} (best {t['best_acc']:.4f}), "
        f"{t['steps']} steps, {t['wall_s']:.1f} s -> {res.weights_path}")
    return 0


def _cmd_distill(args, log) -> int:
    from .runs import distill

    cfg = _load_cfg(args, methods=(args.method,) if args.method else None)
    res = distill(cfg, args.out, method=args.method, teacher=args.teacher, resume=args.resume,
                  overwrite=args.overwrite, quiet=args.quiet, log=log)
    (m, e), = res.summary["methods"].items()
    skipped = e.get("skipped_batches") or 0
    log(f"{m}: test acc {e['test_acc']:.4f} (best {e['best_acc']:.4f}), {e['steps']} steps"
        + (f" ({skipped} batches skipped as non-finite)" if skipped else "")
        + f", {e['wall_s']:.1f} s -> {res.weights_path}")
    return 0


def _run_compare(args, log, default_config=None) -> int:
    from . import reports
    from .runs import compare

    methods = [m.strip() for m in getattr(args, "methods", "ce,kd,isl").split(",") if m.strip()]
    cfg = _load_cfg(args, default_config, methods=methods)
    summary = compare(cfg, args.out, methods=methods, teacher=getattr(args, "teacher", None),
                      resume=args.resume, overwrite=args.overwrite, quiet=args.quiet, log=log)
    log("")
    log(reports.format_table(summary))
    log(f"summary: {os.path.join(args.out, 'summary.json')}")
    log("plots: " + ", ".join(summary["plots"]))
    return 0


def _cmd_score(args, log) -> int:
    import numpy as np

    from .atomic_files import atomic_write
    from .checkpoint_io import load_model_weights
    from .models import get_model
    from .runtime import setup_run
    from .scoring import SCORE_FIELDS, TeacherLogitCache, score_dataset
    from .run_inputs import (build_data, load_teacher, make_loader, ordered_batch_size,
                             shared_teacher_logits)

    run_role = None
    if args.config is None:
        # A run's own weights (student.pt, teacher.pt, checkpoint.pt in its folder): its config.yaml
        # says the data and the architecture, unlike the built-in defaults.
        run_config, run_role = _run_config_of(args.checkpoint)
        if run_config is not None:
            args.config = run_config
            log(f"score: using {run_config} (the config of the run that wrote --checkpoint)")
    cfg = _load_cfg(args, methods=())  # scoring reads no curriculum (the run may be a short kd one)
    if not os.path.isfile(args.checkpoint):  # before the data is loaded
        raise FileNotFoundError(f"--checkpoint not found: {args.checkpoint}")
    ctx = setup_run(cfg.device, seed=cfg.seed, deterministic=cfg.deterministic)
    if ctx.is_main:
        os.makedirs(args.out, exist_ok=True)  # an unusable --out fails now, not after the pass
    data = build_data(cfg, progress=False if args.quiet else None)
    split = data.train if args.split == "train" else data.test
    arch = args.arch or (cfg.teacher.arch if run_role == "teacher" else cfg.student.arch)
    model = get_model(arch, data.num_classes, image_size=cfg.data.image_size,
                      in_channels=data.in_channels)
    try:
        load_model_weights(model, args.checkpoint)
    except ValueError as exc:
        from .checkpoint_io import fit_hint

        hint = fit_hint(args.checkpoint, data.num_classes, "--arch ", in_channels=data.in_channels,
                        image_size=cfg.data.image_size)
        raise ValueError(f"--checkpoint {args.checkpoint} does not fit --arch {arch} with "
                         f"{data.num_classes} classes: {exc}{hint}") from None
    model.to(ctx.device).eval()
    # Sharded under torchrun: each rank scores its part, score_dataset sums the parts.
    loader = make_loader(cfg, split, ctx, augment=False, seed=cfg.seed, shard=ctx.shard,
                          batch_size=ordered_batch_size(len(split), cfg.optim.batch_size,
                                                        ctx.world_size))
    loader.set_order(np.arange(len(split)))
    t_logits = None
    if args.teacher:
        teacher = load_teacher(cfg, args.teacher, data.num_classes, ctx.device,
                               in_channels=data.in_channels)
        cache_dir = cfg.train.teacher_cache_dir or os.path.join(args.out, "cache")
        key = data.key if args.split == "train" else data.test_key
        t_logits = shared_teacher_logits(
            ctx, TeacherLogitCache(cache_dir, dtype=cfg.train.teacher_cache_dtype), teacher,
            loader, num_items=len(split), key=key, device=ctx.device,
            progress=not args.quiet and sys.stderr.isatty() and ctx.is_main)
    scores = score_dataset(model, loader, t_logits, num_items=len(split),
                           temperature=cfg.loss.temperature, device=ctx.device,
                           progress=not args.quiet and sys.stderr.isatty() and ctx.is_main)
    if not ctx.is_main:
        return 0
    path = os.path.join(args.out, f"scores_{args.split}.npy")
    atomic_write(path, lambda fh: np.save(fh, scores.cpu().numpy()))  # an older file stays whole
    means = scores.float().mean(0).tolist()
    # Without a teacher the kd column is 0 by definition, not a measurement.
    log(f"scored {len(split)} {args.split} instances with {arch}: " +
        " ".join(f"{f}=n/a" if f == "kd" and t_logits is None else f"{f}={v:.4f}"
                 for f, v in zip(SCORE_FIELDS, means)))
    log(f"columns {', '.join(SCORE_FIELDS)} -> {path}"
        + ("" if t_logits is not None else " (kd is 0 there: no --teacher)"))
    return 0


def _run_config_of(checkpoint: str) -> tuple[str | None, str | None]:
    """(config.yaml, role) of the run directory holding ``checkpoint``, or (None, None)."""
    from .run_dir import read_identity

    folder = os.path.dirname(os.path.abspath(checkpoint))
    config = os.path.join(folder, "config.yaml")
    role = (read_identity(folder) or {}).get("role")
    return (config, role) if role in ("student", "teacher") and os.path.isfile(config) else (None, None)


def _describe_os_error(exc: OSError) -> str:
    """Python's "[Errno 17] File exists: 'x'" for the path problems a user can fix, in words."""
    import errno

    path = exc.filename
    if path is None:
        return str(exc)
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return f"{path}: a file is in the way (it, or a folder above it, is a file where a directory is needed)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{path}: not writable here ({exc.strerror}); choose another --out or fix its permissions"
    return f"{path}: {exc.strerror or exc}"


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def main(argv=None) -> int:
    from ._extension import EXTENSION_ERROR, CudaKernelsUnavailable

    args = build_parser().parse_args(argv)
    if args.command == "info":  # the one command that runs, and reports it, when _C did not load
        return _cmd_info(args, print)
    if EXTENSION_ERROR is not None:
        print(f"error: {EXTENSION_ERROR}", file=sys.stderr, flush=True)
        return 2

    from .runtime import CheckpointError, teardown_distributed
    from .trainer import NonFiniteError, Preempted

    # The process group is created later, inside setup_run; the flags travel as the variables
    # it reads, so every subcommand honours them.
    if getattr(args, "dist_backend", None) is not None:
        os.environ["KDSEQ_DIST_BACKEND"] = args.dist_backend
    if getattr(args, "dist_timeout", None) is not None:
        os.environ["KDSEQ_DIST_TIMEOUT"] = repr(args.dist_timeout)
    rank = _rank()
    where = f" (rank {rank})" if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1" else ""

    def log(msg: str) -> None:
        if rank == 0:  # the other ranks run the same job; one copy of the log is enough
            print(msg, flush=True)

    def error(msg: str) -> None:
        print(f"error{where}: {msg}", file=sys.stderr, flush=True)

    handlers = {"train-teacher": _cmd_train_teacher, "distill": _cmd_distill,
                "compare": _run_compare, "score": _cmd_score,
                "demo": lambda a, lg: _run_compare(a, lg, default_config="digits_quick")}
    rc = 1
    try:
        rc = handlers[args.command](args, log)
    except Preempted as exc:
        log(str(exc))
        rc = 0
    except NonFiniteError as exc:
        error(str(exc))
        rc = 3
    except (ValueError, TypeError, OSError, CheckpointError, CudaKernelsUnavailable) as exc:
        # OSError: a path that cannot be used (--out is a file, a missing or unreadable file).
        error(_describe_os_error(exc) if isinstance(exc, OSError) else str(exc))
        rc = 2
    except KeyboardInterrupt:
        # Ctrl-C where no run is training (score's pass): nothing to checkpoint, nothing written.
        error(f"interrupted (SIGINT): {args.command} stopped before it finished; run it again")
        rc = 130
    except BaseException:
        # Anything else (a failed collective, a bug) propagates with its traceback and a
        # non-zero exit; torchrun then stops the other ranks.
        if where:
            print(f"error{where}: unhandled exception, see the traceback below", file=sys.stderr,
                  flush=True)
        raise
    finally:
        # Only a clean finish leaves the group quiescent; after a failure the other ranks may
        # still sit in a collective, and process exit (torchrun stops them) is the safe cleanup.
        if rc == 0:
            teardown_distributed()
    return rc


def entry() -> None:
    """The ``kdseq-fast`` command and ``python -m kdseq_fast``: :func:`main`, then the exit (a
    torchrun rank ends through :func:`kdseq_fast.runtime.exit_process`, see there why)."""
    import traceback

    from .runtime import exit_process, had_process_group

    try:
        code = main()
    except SystemExit:
        raise  # argparse's usage errors come before any process group exists
    except BaseException as exc:
        if not had_process_group():
            raise
        # A failed rank ends the same early way: an abort in the teardown would replace the
        # exception's exit status with SIGABRT in torchrun's report of the first failure.
        traceback.print_exc()
        exit_process(130 if isinstance(exc, KeyboardInterrupt) else 1)
    exit_process(code)


if __name__ == "__main__":
    entry()
