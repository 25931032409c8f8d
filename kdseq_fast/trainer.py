"""One trainer for the three methods: ``ce`` (student alone), ``kd`` (Hinton KD), ``isl`` (ISL-KD).

``isl`` runs, in global epochs::

    warm-up (uniform KD) | phase 1 | ... | phase P | final full-data epochs
                         ^ snapshot -> score -> order, at the start of every phase

Every run is resumable bit-exactly (CPU, deterministic mode): the checkpoint holds the student,
optimizer, LR scheduler, AMP scaler, all RNG states, the position inside the epoch, the current
phase's scores and instance sequence, the running sums of the epoch's metrics and a hash of the
config. Epoch orders are pure functions of (seed, phase, epoch, sequence), so they are regenerated
rather than stored.

Under ``torchrun`` the same code runs on every rank with the student wrapped in
``DistributedDataParallel``: ``optim.batch_size`` is the *global* batch (each rank trains on its
``numpy.array_split`` share of every global batch; the LR is never rescaled), scoring and the
teacher-logit pass are split across ranks and summed into the full matrices, every rank builds the
identical instance sequence, and evaluation counts are summed over ranks.

Outputs in ``out_dir`` (main process only): ``metrics.jsonl``, ``phase_K_order.npy``,
``phase_K_scores.npy``, ``checkpoint.pt`` (+ ``checkpoint.prev.pt``), ``student.pt`` (or
``teacher.pt`` for teacher training), ``summary.json``, ``config.yaml``, ``run.json`` and plots.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from .config import Config, config_hash, phase_epochs as _phase_epochs, save_config
from .curriculum import InstanceSequence, OrderGenerator, Pacing
from .runtime import (CheckpointError, GracefulStop, RunContext, SegmentTimer,
                      atomic_write_bytes, capture_rng_state, load_latest_checkpoint,
                      restore_rng_state, save_checkpoint, setup_run, test_dump_hook,
                      test_kill_hook)

__all__ = [
    "Trainer", "TrainResult", "Callback", "ConsoleLogger", "TensorBoardLogger", "Preempted",
    "NonFiniteError", "RunDirError", "METHODS", "RESUME_IGNORED_KEYS", "build_data",
    "load_teacher", "train_teacher", "distill", "compare", "ordered_batch_size",
    "rank_loss_weight", "shared_teacher_logits",
]

METHODS = ("ce", "kd", "isl")

# Keys that may change between a run and its resume without changing the result: where it runs,
# where data lives, logging, and how often it checkpoints. `train.nonfinite` is here so a run
# stopped by a bad batch can be resumed with `nonfinite=skip`.
RESUME_IGNORED_KEYS = ("device", "data.root", "data.download", "data.num_threads",
                       "data.loader_backend", "train.tensorboard", "train.checkpoint_every_steps",
                       "train.teacher_cache_dir", "train.nonfinite", "train.target_acc",
                       "teacher.checkpoint")

CHECKPOINT_FORMAT = 1


class Preempted(Exception):
    """Raised after a SIGTERM/SIGINT was honoured: the step finished and a checkpoint was saved."""


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient; the last good state was checkpointed before raising."""


class RunDirError(ValueError):
    """The output directory holds a different run, or a run that would be overwritten."""


# --------------------------------------------------------------------------------------------
# Callbacks
# --------------------------------------------------------------------------------------------
class Callback:
    """Hooks the trainer calls; override any subset. Only called on the main process."""

    def on_train_start(self, trainer: "Trainer") -> None: ...
    def on_phase_start(self, trainer: "Trainer", phase: int, sequence: np.ndarray,
                       scores: torch.Tensor) -> None: ...
    def on_step_end(self, trainer: "Trainer", step: int, loss: float) -> None: ...
    def on_epoch_end(self, trainer: "Trainer", record: dict) -> None: ...
    def on_train_end(self, trainer: "Trainer", summary: dict) -> None: ...


class ConsoleLogger(Callback):
    """One concise line per epoch, e.g.
    ``[isl] phase 1 epoch 7/12 step 1234 lr 0.05 loss 0.8123 acc 0.9444 admit 0.60 1234 img/s``."""

    def __init__(self, log: Callable[[str], None] = print):
        self.log = log

    def on_epoch_end(self, trainer, record):
        acc = "  -   " if record["test_acc"] is None else f"{record['test_acc']:.4f}"
        self.log(f"[{trainer.label}] phase {record['phase']} epoch {record['epoch']}/"
                 f"{trainer.total_epochs} step {record['steps']} lr {record['lr']:.4g} "
                 f"loss {record['train_loss']:.4f} acc {acc} admit {record['admitted_frac']:.2f} "
                 f"{record['images_per_s']:.0f} img/s")


class TensorBoardLogger(Callback):
    """Scalars per epoch under ``out_dir/tb`` (import deferred: tensorboard is slow to load)."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.writer = None

    def on_train_start(self, trainer):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # optional dependency: say so once, keep training
            trainer.log(f"note: tensorboard logging disabled ({exc})")
            return
        self.writer = SummaryWriter(self.log_dir)

    def on_epoch_end(self, trainer, record):
        if self.writer is None:
            return
        step = record["steps"]
        for key in ("train_loss", "test_acc", "lr", "admitted_frac", "images_per_s"):
            if record.get(key) is not None:
                self.writer.add_scalar(f"{trainer.label}/{key}", record[key], step)
        self.writer.flush()

    def on_train_end(self, trainer, summary):
        if self.writer is not None:
            self.writer.close()


# --------------------------------------------------------------------------------------------
# Data and models
# --------------------------------------------------------------------------------------------
@dataclass
class DataBundle:
    train: Any           # DatasetSplit
    test: Any            # DatasetSplit
    num_classes: int
    key: str             # identifies the training data for the teacher-logit cache
    in_channels: int = 3  # image channels the models are built for (1 for Fashion-MNIST)


def build_data(cfg: Config) -> DataBundle:
    """Training and test splits named by ``cfg.data`` (missing files -> FileNotFoundError
    naming the files and the download switch, raised by the datasets module)."""
    from .datasets import dataset_from_config

    train = dataset_from_config(cfg, "train")
    test = dataset_from_config(cfg, "test")
    if train.num_classes != test.num_classes:
        raise ValueError(f"train/test class counts differ: {train.num_classes} vs {test.num_classes}")
    d = cfg.data
    key = f"{d.name}-train-n{len(train)}-s{d.image_size}"
    if d.name == "synthetic":
        key += f"-c{d.synthetic_classes}"
    channels = 3 if train.is_files else int(train.images.shape[-1])
    return DataBundle(train, test, int(train.num_classes), key, channels)


def ordered_batch_size(num_items: int, batch_size: int, world: int) -> int:
    """Batch size for an ordered pass (scoring, teacher logits, evaluation) that covers every
    item on ``world`` ranks: the sharded loader drops a last global batch with fewer rows than
    ranks (so every rank steps together), which would lose items here, so shrink the batch until
    the remainder is zero or at least ``world``."""
    if world <= 1:
        return batch_size
    if num_items < world:
        raise ValueError(f"a split of {num_items} items cannot be spread over {world} ranks "
                         "(every rank needs at least one row); use fewer processes")
    if num_items == world:
        return world
    b = max(int(batch_size), world)
    while 0 < num_items % b < world:
        b -= 1
    return b


def rank_loss_weight(local_rows: int, global_rows: int, world: int) -> float:
    """Factor on a rank's mean loss so that DDP's *average* of the ranks' gradients equals the
    gradient of the mean loss over the whole global batch: ``local_rows * world / global_rows``
    (exactly 1.0 when the batch splits evenly)."""
    if world <= 1 or local_rows * world == global_rows:
        return 1.0
    return local_rows * world / global_rows


def _make_loader(cfg: Config, split, ctx: RunContext, *, augment: bool, seed: int,
                 shard=None, batch_size: int | None = None):
    from .data import CurriculumLoader

    files = isinstance(split.images, (list, tuple))
    aug = None
    if augment and cfg.data.augment != "none":
        aug = "rrc" if files else "cifar"
    return CurriculumLoader(
        split.images, split.labels, batch_size or cfg.optim.batch_size, backend=cfg.data.loader_backend,
        device=ctx.device.type, augment=aug, mean=split.mean, std=split.std, drop_last=False,
        num_threads=cfg.data.num_threads, seed=seed, shard=shard,
        image_size=cfg.data.image_size if files else None)


def load_teacher(cfg: Config, path: str, num_classes: int, device=None,
                 in_channels: int = 3) -> torch.nn.Module:
    """Build ``cfg.teacher.arch`` and load ``path`` into it (plain, RepDistiller ``{"model": sd}``,
    ours); a checkpoint for another architecture or class count raises ``ValueError`` naming the
    mismatched keys."""
    from .checkpoint_io import load_model_weights
    from .models import get_model

    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"teacher checkpoint not found: {path!r} (train one with "
                                "`kdseq-fast train-teacher --out DIR` or pass --teacher PATH)")
    model = get_model(cfg.teacher.arch, num_classes, image_size=cfg.data.image_size,
                      in_channels=in_channels)
    try:
        load_model_weights(model, path)
    except ValueError as exc:
        raise ValueError(f"teacher checkpoint {path} does not fit teacher.arch="
                         f"{cfg.teacher.arch} with {num_classes} classes: {exc}") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device) if device is not None else model


def shared_teacher_logits(ctx: RunContext, cache, teacher: torch.nn.Module, loader, *,
                          num_items: int, key: str, device, amp=None,
                          progress: bool = False) -> torch.Tensor:
    """``cache.get(...)`` that every rank agrees on under torch.distributed.

    Rank 0 alone decides whether a stored cache file is usable; on a hit it reads the file and
    broadcasts the matrix (the other ranks need not see rank 0's disk), on a miss every rank
    scores its shard and the pass sums them (``compute_logits``), then rank 0 stores the result.
    Letting each rank decide would deadlock when only some of them find the file.
    """
    if not ctx.distributed:
        return cache.get(teacher, loader, num_items=num_items, key=key, device=device, amp=amp,
                         progress=progress)
    from .scoring import TeacherLogitCache

    stored = None

    def usable() -> bool:  # runs on rank 0 only; the matrix it finds is what rank 0 broadcasts
        nonlocal stored
        stored = cache.load(teacher, num_items=num_items, key=key)
        return stored is not None

    if ctx.run_on_main(usable):
        if ctx.is_main:
            cache.last_hit = True
        # load(), not get(): get() is a collective, and only rank 0 read the file.
        return ctx.broadcast_tensor(stored)
    # Only rank 0 may write the file; the others keep their copy in memory.
    local = cache if ctx.is_main else TeacherLogitCache(None, dtype=cache.dtype)
    return local.get(teacher, loader, num_items=num_items, key=key, device=device, amp=amp,
                     progress=progress)


@dataclass
class TrainResult:
    out_dir: str
    summary: dict
    weights_path: str


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_json(obj, path: str) -> None:
    atomic_write_bytes(json.dumps(obj, indent=2, default=_json_default).encode() + b"\n", path)


def _save_npy(arr: np.ndarray, path: str) -> None:
    buf = io.BytesIO()
    np.save(buf, arr)
    atomic_write_bytes(buf.getvalue(), path)


def _config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(a) | set(b)):
        dotted = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += _config_diff(va, vb, dotted + ".")
        elif va != vb and dotted not in RESUME_IGNORED_KEYS:
            keys.append(f"{dotted} ({va!r} in the checkpoint, {vb!r} now)")
    return keys


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------
class Trainer:
    """Trains one model with one method into ``out_dir``; see the module docstring.

    Args:
        cfg: validated :class:`~kdseq_fast.config.Config`.
        out_dir: run directory (created). Refuses a directory that holds another run.
        method: ``ce``/``kd``/``isl``; default ``cfg.method``.
        role: ``"student"`` (distillation) or ``"teacher"`` (train ``cfg.teacher.arch`` with
            ``ce``, epochs/LR from ``cfg.teacher``; writes ``teacher.pt`` and ``teacher_best.pt``).
        teacher: a teacher module or checkpoint path (required for ``kd``/``isl``); default
            ``cfg.teacher.checkpoint``.
        resume: continue from ``out_dir/checkpoint.pt`` (falls back to ``checkpoint.prev.pt``).
        overwrite: allow starting over in a directory that already holds this or another run.
        data: pre-built :class:`DataBundle` (shared across the methods of ``compare``).
        quiet: no tqdm bars (they are also off when stderr is not a terminal).
    """

    def __init__(self, cfg: Config, out_dir: str, *, method: str | None = None,
                 role: str = "student", teacher=None, resume: bool = False,
                 overwrite: bool = False, data: DataBundle | None = None, quiet: bool = False,
                 callbacks: Sequence[Callback] = (), log: Callable[[str], None] = print,
                 ctx: RunContext | None = None, label: str | None = None,
                 sync_timing: bool = False):
        if not isinstance(cfg, Config):
            raise TypeError(f"cfg must be a kdseq_fast.config.Config, got {type(cfg).__name__}")
        if role not in ("student", "teacher"):
            raise ValueError(f"role must be 'student' or 'teacher', got {role!r}")
        method = "ce" if role == "teacher" else (method or cfg.method)
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
        self.cfg, self.method, self.role = cfg, method, role
        self.out_dir = os.path.abspath(out_dir)
        self.label = label or ("teacher" if role == "teacher" else method)
        self.log = log
        self.quiet = quiet
        self.ctx = ctx or setup_run(cfg.device, seed=cfg.seed, deterministic=cfg.deterministic)
        self.device = self.ctx.device
        self.callbacks = list(callbacks)

        # Epoch plan ------------------------------------------------------------------------
        if role == "teacher":
            self.total_epochs = cfg.teacher.epochs or cfg.optim.epochs
            self.base_lr = cfg.teacher.lr or cfg.optim.lr
            # A shorter teacher schedule keeps the decay points at the same fractions.
            scale = self.total_epochs / cfg.optim.epochs
            self.milestones = sorted({max(1, round(m * scale)) for m in cfg.optim.lr_decay_epochs})
            self.arch = cfg.teacher.arch
        else:
            self.total_epochs = cfg.optim.epochs
            self.base_lr = cfg.optim.lr
            self.milestones = list(cfg.optim.lr_decay_epochs)
            self.arch = cfg.student.arch
        self.schedule = self._build_schedule()

        # Rank 0 alone reads the directory (the others would race its writes) and shares the
        # verdict, so a refused directory stops every rank with the same error.
        self.ctx.run_on_main(lambda: self._check_run_dir(resume, overwrite))

        # Data ------------------------------------------------------------------------------
        if cfg.optim.batch_size < self.ctx.world_size:
            raise ValueError(f"optim.batch_size={cfg.optim.batch_size} is the global batch and must "
                             f"be at least the number of processes ({self.ctx.world_size})")
        self.data = data or build_data(cfg)
        self.num_items = len(self.data.train)
        self.num_classes = self.data.num_classes
        shard = self.ctx.shard
        self.train_loader = _make_loader(cfg, self.data.train, self.ctx, augment=True,
                                         seed=cfg.seed, shard=shard)
        # Evaluation is sharded too: each rank counts its share and evaluate() sums the counts.
        self.test_loader = _make_loader(
            cfg, self.data.test, self.ctx, augment=False, seed=cfg.seed, shard=shard,
            batch_size=ordered_batch_size(len(self.data.test), cfg.optim.batch_size,
                                          self.ctx.world_size))
        self.test_loader.set_order(np.arange(len(self.data.test)))
        self.orders = OrderGenerator(self.num_items, cfg.optim.batch_size, seed=cfg.seed)
        self.steps_per_epoch = self.orders.steps_per_epoch
        cur = cfg.curriculum
        self.pacing = Pacing(cur.pacing, cur.start_frac, cur.full_at)

        # Models ----------------------------------------------------------------------------
        from .models import get_model
        from .runtime import seed_everything

        # Seed right before initialisation so the initial student depends on the seed alone
        # (not on what dataset loading consumed): every method starts from the same weights.
        seed_everything(cfg.seed)
        self.model = get_model(self.arch, self.num_classes, image_size=cfg.data.image_size,
                               in_channels=self.data.in_channels)
        self.channels_last = (cfg.train.channels_last is True or
                              (cfg.train.channels_last == "auto" and self.device.type == "cuda"))
        mf = torch.channels_last if self.channels_last else torch.contiguous_format
        self.model.to(self.device, memory_format=mf)
        net = self.model
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # Construction broadcasts rank 0's weights and buffers; every forward re-broadcasts
            # the BatchNorm running statistics, so the ranks' models stay identical. Batch
            # statistics are per rank (no SyncBatchNorm), as in torchvision's reference recipes.
            net = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.ddp = net if self.ctx.distributed else None
        self.train_model = torch.compile(net) if cfg.train.compile else net
        self._buffers = list(self.model.buffers())
        self._buffer_backup = [b.detach().clone() for b in self._buffers]

        self.teacher = None
        self.teacher_path = None
        if method in ("kd", "isl"):
            teacher = teacher if teacher is not None else cfg.teacher.checkpoint
            if teacher is None:
                raise ValueError(f"method {method!r} needs a teacher: pass --teacher PATH or set "
                                 "teacher.checkpoint (train one with `kdseq-fast train-teacher`)")
            if isinstance(teacher, torch.nn.Module):
                self.teacher = teacher.eval()
            else:
                self.teacher_path = os.path.abspath(os.fspath(teacher))
                self.teacher = load_teacher(cfg, self.teacher_path, self.num_classes,
                                            in_channels=self.data.in_channels)
            self.teacher.to(self.device, memory_format=mf)

        # Optimization ----------------------------------------------------------------------
        o = cfg.optim
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.base_lr,
                                         momentum=o.momentum, weight_decay=o.weight_decay,
                                         nesterov=o.nesterov)
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=self.milestones, gamma=o.lr_decay_rate)
        from .amp import amp_dtype, resolve_amp

        # One vocabulary ("none"/"bf16"/"fp16") from here to every consumer (scoring, teacher pass).
        self.amp = resolve_amp(cfg.train.amp, self.device)
        self.amp_dtype = amp_dtype(self.amp)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self.timer = SegmentTimer(self.device, sync=sync_timing)

        # Progress state (everything the checkpoint holds) ------------------------------------
        self.epoch = 0              # index of the epoch in progress / next to run
        self.batch_in_epoch = 0     # next batch of that epoch
        self.global_step = 0
        self.scored_phase = -1      # phase whose sequence/scores are held
        self.sequence: np.ndarray | None = None
        self.scores: torch.Tensor | None = None
        self.accum = self._new_accum()
        self.history: list[tuple[int, float]] = []   # (steps, test_acc) at each evaluation
        self.best_acc = 0.0
        self.best_state = None
        self.wall_before = 0.0      # training wall time spent by earlier processes of this run
        self.metrics_lines = 0
        self.teacher_acc = None
        self.skipped_batches = 0
        self._teacher_train_logits = None
        self._score_loader_obj = None
        self._resume_state = None
        self._last_checkpoint_step = None
        from .scoring import teacher_fingerprint

        self.teacher_fingerprint = teacher_fingerprint(self.teacher) if self.teacher is not None else None

        if self.ctx.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
        if resume:
            self._load_resume_state()
        if self.ctx.is_main and self._resume_state is None:
            self._init_run_dir()

    # ------------------------------------------------------------------ plan
    def _build_schedule(self) -> list[tuple[int, str, int, int]]:
        """(phase, kind, epoch_in_phase, phase_len) for each global epoch."""
        if self.method != "isl":
            return [(0, "uniform", e, self.total_epochs) for e in range(self.total_epochs)]
        cur = self.cfg.curriculum
        pe = _phase_epochs(self.cfg)
        plan = [(0, "uniform", e, cur.warmup_epochs) for e in range(cur.warmup_epochs)]
        for k in range(1, cur.num_phases + 1):
            plan += [(k, "curriculum", e, pe) for e in range(pe)]
        plan += [(cur.num_phases + 1, "uniform", e, cur.final_full_epochs)
                 for e in range(cur.final_full_epochs)]
        assert len(plan) == self.total_epochs, "epoch accounting is validated by the config"
        return plan

    # ------------------------------------------------------------------ run directory
    @property
    def _resume_hash(self) -> str:
        return config_hash(self.cfg, exclude=RESUME_IGNORED_KEYS)

    def _run_identity(self) -> dict:
        return {"role": self.role, "method": self.method, "resume_hash": self._resume_hash,
                "config_hash": config_hash(self.cfg), "teacher": self.teacher_path}

    def _check_run_dir(self, resume: bool, overwrite: bool) -> None:
        run_json = os.path.join(self.out_dir, "run.json")
        if not os.path.exists(run_json) or overwrite:
            return
        try:
            with open(run_json) as fh:
                other = json.load(fh)
        except (OSError, ValueError):
            other = {}
        same = (other.get("resume_hash") == self._resume_hash and other.get("role") == self.role
                and other.get("method") == self.method)
        if not same:
            diff = []
            try:
                with open(os.path.join(self.out_dir, "config.yaml")) as fh:
                    diff = _config_diff(yaml.safe_load(fh) or {}, self.cfg.to_dict())
            except (OSError, ValueError, yaml.YAMLError):
                pass
            what = ("; config differs: " + "; ".join(diff)) if diff else \
                (f" (config hash {str(other.get('resume_hash'))[:12]} vs "
                 f"{self._resume_hash[:12]} now)")
            raise RunDirError(
                f"output directory {self.out_dir} already holds a different run (role "
                f"{other.get('role')}, method {other.get('method')}){what}; "
                + ("resume with the original settings (see config.yaml there), " if resume else "")
                + "choose another --out or pass --overwrite")
        if not resume:
            raise RunDirError(f"output directory {self.out_dir} already holds this run; pass "
                              "--resume to continue it or --overwrite to start over")

    def _init_run_dir(self) -> None:
        # Starting fresh (new directory or --overwrite): nothing of an older run may survive to
        # be mistaken for this one's output or resumed into it.
        stale = ["metrics.jsonl", "summary.json", "checkpoint.pt", "checkpoint.prev.pt",
                 "student.pt", "teacher.pt", "teacher_best.pt"]
        stale += [n for n in os.listdir(self.out_dir)
                  if n.startswith("phase_") and n.endswith(".npy")]
        for name in stale:
            path = os.path.join(self.out_dir, name)
            if os.path.exists(path):
                os.remove(path)
        save_config(self.cfg, os.path.join(self.out_dir, "config.yaml"))
        write_json(self._run_identity(), os.path.join(self.out_dir, "run.json"))

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "role": self.role, "method": self.method,
            "config": self.cfg.to_dict(), "resume_hash": self._resume_hash,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": capture_rng_state(),
            "progress": {"epoch": self.epoch, "batch": self.batch_in_epoch,
                         "global_step": self.global_step, "scored_phase": self.scored_phase,
                         "metrics_lines": self.metrics_lines,
                         "wall_s": self.wall_before + self._wall_this_process(),
                         "skipped_batches": self.skipped_batches},
            "curriculum": {
                "sequence": None if self.sequence is None else torch.from_numpy(self.sequence),
                "scores": self.scores},
            "accum": dict(self.accum),
            "history": [list(h) for h in self.history],
            "best_acc": self.best_acc, "best_state": self.best_state,
            "teacher_acc": self.teacher_acc, "teacher_fingerprint": self.teacher_fingerprint,
        }

    def _wall_this_process(self) -> float:
        return time.perf_counter() - self._t_start if getattr(self, "_t_start", None) else 0.0

    def save_checkpoint(self, reason: str = "") -> None:
        # Every rank calls this at the same points. The epoch's running loss sums are per rank:
        # the checkpoint keeps each rank's pair (an exact resume with the same world size) and
        # their totals (what a resume with another world size gives rank 0).
        per_rank = None
        if self.ctx.distributed:
            w, r = self.ctx.world_size, self.ctx.rank
            slots = [0.0] * (2 * w)
            slots[2 * r], slots[2 * r + 1] = self.accum["loss_sum"], float(self.accum["samples"])
            slots = self.ctx.reduce_sum(slots)  # a sum of one-hot slots: an all-gather
            per_rank = [[slots[2 * k], int(slots[2 * k + 1])] for k in range(w)]
        if self.ctx.is_main:
            state = self.state_dict()
            if per_rank is not None:
                state["accum"]["rank_sums"] = per_rank
                state["accum"]["loss_sum"] = math.fsum(p[0] for p in per_rank)
                state["accum"]["samples"] = sum(p[1] for p in per_rank)
            save_checkpoint(state, self.out_dir)
        self._last_checkpoint_step = self.global_step

    def _load_resume_state(self) -> None:
        # Rank 0 reads the checkpoint and sends it to the others: one consistent state even if
        # rank 0 falls back to checkpoint.prev.pt, and no shared disk needed across nodes.
        found = self.ctx.run_on_main(lambda: load_latest_checkpoint(self.out_dir, log=self.log))
        if found is None:
            self.log(f"[{self.label}] no checkpoint in {self.out_dir}; starting from scratch")
            return
        state, path = found
        if state.get("format") != CHECKPOINT_FORMAT or state.get("role") != self.role \
                or state.get("method") != self.method:
            raise CheckpointError(
                f"{path} is a checkpoint of role {state.get('role')}/method {state.get('method')}, "
                f"not {self.role}/{self.method}")
        if state["resume_hash"] != self._resume_hash:
            diff = _config_diff(state["config"], self.cfg.to_dict())
            raise CheckpointError(
                f"cannot resume {path}: the config differs from the one the run was started with: "
                + ("; ".join(diff) or "(hash mismatch)") + ". Resume with the original config "
                "(see config.yaml in the run directory) or start a new --out")
        if state.get("teacher_fingerprint") != self.teacher_fingerprint:
            raise CheckpointError(
                f"cannot resume {path}: the teacher weights differ from the teacher the run was "
                "started with; pass the original --teacher or start a new --out")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        # Last, after everything that consumed random numbers while building this trainer.
        restore_rng_state(state["rng"])
        p = state["progress"]
        self.epoch, self.batch_in_epoch = p["epoch"], p["batch"]
        self.global_step, self.scored_phase = p["global_step"], p["scored_phase"]
        self.metrics_lines, self.wall_before = p["metrics_lines"], p["wall_s"]
        self.skipped_batches = p["skipped_batches"]
        seq = state["curriculum"]["sequence"]
        self.sequence = None if seq is None else seq.numpy().astype(np.int64)
        self.scores = state["curriculum"]["scores"]
        accum = dict(state["accum"])
        per_rank = accum.pop("rank_sums", None)
        self.accum = {**self._new_accum(), **accum}
        if per_rank is not None and len(per_rank) == self.ctx.world_size:
            self.accum["loss_sum"], self.accum["samples"] = per_rank[self.ctx.rank]
        elif not self.ctx.is_main:
            self.accum["loss_sum"], self.accum["samples"] = 0.0, 0  # rank 0 holds the totals
        self.history = [(int(s), float(a)) for s, a in state["history"]]
        self.best_acc, self.best_state = state["best_acc"], state["best_state"]
        self.teacher_acc = state["teacher_acc"]
        self._resume_state = state
        self._last_checkpoint_step = self.global_step
        if self.ctx.is_main:
            # Epoch records written after this checkpoint will be produced again.
            self._truncate_metrics(self.metrics_lines)
        self.log(f"[{self.label}] resuming from {os.path.basename(path)}: epoch "
                 f"{self.epoch + 1}/{self.total_epochs}, batch {self.batch_in_epoch}, "
                 f"step {self.global_step}")

    def _truncate_metrics(self, lines: int) -> None:
        path = os.path.join(self.out_dir, "metrics.jsonl")
        if not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as fh:
            kept = fh.readlines()[:lines]
        atomic_write_bytes("".join(kept).encode(), path)

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _new_accum() -> dict:
        return {"loss_sum": 0.0, "samples": 0, "steps": 0, "admitted_sum": 0.0, "data": 0.0,
                "model": 0.0, "loss": 0.0, "scoring": 0.0, "teacher_cache": 0.0, "train_time": 0.0}

    def _emit(self, hook: str, *args) -> None:
        if not self.ctx.is_main:
            return
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @property
    def _progress(self) -> bool:
        # Bars only for a person watching: not in logs, not on other ranks, not with --quiet.
        return not self.quiet and self.ctx.is_main and sys.stderr.isatty()

    def _bar(self, total: int, initial: int, desc: str):
        from tqdm.auto import tqdm

        disable = not self._progress
        return tqdm(total=total, initial=initial, desc=desc, leave=False, disable=disable,
                    dynamic_ncols=True)

    def _to_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ evaluation and scoring
    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module | None = None) -> float:
        """Top-1 accuracy on the test split, as a fraction."""
        model = model or self.model
        was_training = model.training
        model.eval()
        correct = total = 0
        try:
            for batch in self.test_loader:
                with self._autocast():
                    logits = model(self._to_input(batch["images"]))
                labels = batch["labels"].to(self.device)
                correct += int((logits.argmax(1) == labels).sum())
                total += int(labels.numel())
        finally:
            model.train(was_training)
        correct, total = self.ctx.reduce_sum([correct, total])
        return correct / max(total, 1)

    def _score_loader(self):
        if self._score_loader_obj is None:
            # Sharded: each rank scores its part and score_dataset/compute_logits sum the parts.
            loader = _make_loader(self.cfg, self.data.train, self.ctx, augment=False,
                                  seed=self.cfg.seed, shard=self.ctx.shard,
                                  batch_size=ordered_batch_size(self.num_items,
                                                                self.cfg.optim.batch_size,
                                                                self.ctx.world_size))
            loader.set_order(np.arange(self.num_items))
            self._score_loader_obj = loader
        return self._score_loader_obj

    def teacher_train_logits(self) -> torch.Tensor:
        """Teacher logits on the un-augmented training set, from the on-disk cache."""
        if self._teacher_train_logits is None:
            from .scoring import TeacherLogitCache

            cache_dir = self.cfg.train.teacher_cache_dir or os.path.join(self.out_dir, "cache")
            cache = TeacherLogitCache(cache_dir, dtype=self.cfg.train.teacher_cache_dtype)
            self._teacher_train_logits = shared_teacher_logits(
                self.ctx, cache, self.teacher, self._score_loader(), num_items=self.num_items,
                key=self.data.key, device=self.device, amp=self.amp,
                progress=self._progress)
        return self._teacher_train_logits

    def score_snapshot(self) -> torch.Tensor:
        """Score every training instance with a frozen snapshot of the student -> (N, 6)."""
        from .scoring import score_dataset

        # Scoring runs in eval mode under no_grad and leaves the weights untouched, so the live
        # model *is* the snapshot; a deepcopy would only cost memory.
        was_training = self.model.training
        self.model.eval()
        try:
            scores = score_dataset(self.model, self._score_loader(), self.teacher_train_logits(),
                                   num_items=self.num_items,
                                   temperature=self.cfg.loss.temperature, device=self.device,
                                   amp=self.amp, progress=self._progress)
        finally:
            self.model.train(was_training)
        return scores.detach().cpu().float()

    def _start_phase(self, phase: int) -> None:
        from .scoring import difficulty

        t0 = time.perf_counter()
        scores = self.score_snapshot()
        diff = difficulty(scores, self.cfg.curriculum.measure)
        seq = InstanceSequence(diff, self.cfg.curriculum.order, seed=self.cfg.seed, phase=phase)
        self.sequence, self.scores, self.scored_phase = seq.sequence, scores, phase
        self.accum["scoring"] += time.perf_counter() - t0
        if self.ctx.is_main:
            _save_npy(seq.sequence, os.path.join(self.out_dir, f"phase_{phase}_order.npy"))
            _save_npy(scores.numpy(), os.path.join(self.out_dir, f"phase_{phase}_scores.npy"))
        self._emit("on_phase_start", phase, seq.sequence, scores)
        test_dump_hook(f"phase{phase}_sequence", sequence=seq.sequence)
        test_kill_hook("scoring", phase)
        self.save_checkpoint("phase boundary")

    def _epoch_order(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        phase, kind, eip, plen = self.schedule[e]
        if kind == "curriculum":
            return self.orders.paced_epoch(self.sequence, self.pacing, phase=phase,
                                           epoch_in_phase=eip, phase_epochs=plen,
                                           strict_order=self.cfg.curriculum.strict_order,
                                           mix_frac=self.cfg.curriculum.mix_frac)
        full = np.full(self.steps_per_epoch, self.num_items, dtype=np.int64)
        return self.orders.uniform_epoch(phase, e), full

    # ------------------------------------------------------------------ training
    def _loss(self, logits: torch.Tensor, batch: dict, images: torch.Tensor) -> torch.Tensor:
        labels = batch["labels"].to(self.device, non_blocking=True)
        if self.method == "ce":
            return F.cross_entropy(logits.float(), labels)
        from . import kd_loss

        if self._teacher_train_logits is not None and self.cfg.data.augment == "none":
            # Without augmentation the cached logits are exactly what the teacher would output.
            t_logits = self._teacher_train_logits[batch["indices"]].to(self.device, non_blocking=True)
        else:
            with torch.no_grad(), self._autocast():
                t_logits = self.teacher(images)
        t0 = self.timer.now()
        loss = kd_loss(logits, t_logits, labels, temperature=self.cfg.loss.temperature,
                       kd_weight=self.cfg.loss.kd_weight, ce_weight=self.cfg.loss.ce_weight)
        self.timer.add("loss", self.timer.now() - t0)
        return loss

    def _grads_finite(self) -> torch.Tensor:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return torch.tensor(True, device=self.device)
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        return torch.isfinite(norm)

    def _train_step(self, batch: dict, phase: int, weight: float = 1.0) -> float | None:
        """One optimizer step; returns the batch's mean loss (None when the batch was rejected).

        ``weight`` scales the loss for the backward pass only. Under DDP it is
        ``local_rows * world / global_rows``: DDP averages the ranks' gradients, and with this
        weight the average equals the gradient of the global batch's mean loss exactly, also when
        the batch does not split evenly over the ranks (1.0 when it does, and with one process).
        """
        images = self._to_input(batch["images"])
        self.optimizer.zero_grad(set_to_none=True)
        # The forward pass updates BatchNorm running statistics before the loss can be checked;
        # a copy of the (small) buffers lets a rejected batch leave no trace at all.
        with torch.no_grad():
            for dst, src in zip(self._buffer_backup, self._buffers):
                dst.copy_(src)
        t0 = self.timer.now()
        with self._autocast():
            logits = self.train_model(images)
        loss = self._loss(logits, batch, images)
        self.scaler.scale(loss * weight if weight != 1.0 else loss).backward()
        finite = torch.isfinite(loss.detach())
        if not self.scaler.is_enabled():
            # With fp16 the scaler itself skips steps with inf gradients (normal while it
            # calibrates); otherwise a non-finite gradient is a real divergence.
            finite = finite & self._grads_finite()
        finite = bool(finite)
        if self.ctx.distributed:
            # Every rank must take the same branch (step, skip or stop) or the next collective
            # pairs different operations; one rank's bad loss rejects the batch everywhere.
            finite = not self.ctx.any_true(not finite)
        if not finite:
            self._non_finite(batch, phase, float(loss.detach()))
            self.timer.add("model", self.timer.now() - t0)
            return None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        value = float(loss.detach())
        self.timer.add("model", self.timer.now() - t0)
        return value

    def _non_finite(self, batch: dict, phase: int, loss_value: float) -> None:
        with torch.no_grad():
            for dst, src in zip(self._buffers, self._buffer_backup):
                dst.copy_(src)
        idx = batch["indices"].tolist()
        shown = ", ".join(map(str, idx[:16])) + (f", ... ({len(idx)} in all)" if len(idx) > 16 else "")
        what = "loss" if not math.isfinite(loss_value) else "gradient"
        msg = (f"non-finite {what} (loss={loss_value}) at step {self.global_step + 1}, phase "
               f"{phase}, epoch {self.epoch + 1}, batch {self.batch_in_epoch} with dataset "
               f"indices [{shown}]")
        self.optimizer.zero_grad(set_to_none=True)
        if self.cfg.train.nonfinite == "skip":
            self.skipped_batches += 1
            self.log(f"[{self.label}] warning: {msg}; batch skipped (train.nonfinite=skip)")
            return
        params_finite = all(bool(torch.isfinite(t).all()) for t in self.model.state_dict().values()
                            if t.is_floating_point())
        if params_finite:
            # This batch was not applied: the current state is the last good one, positioned
            # at the offending batch.
            self.save_checkpoint("non-finite")
            saved = f"the last good state (step {self.global_step}) is saved in"
        else:
            # An earlier update overflowed the weights while its loss and gradient were still
            # finite; keep the older checkpoint rather than overwrite it with broken weights.
            saved = (f"the weights were already non-finite, so the checkpoint from step "
                     f"{self._last_checkpoint_step} was kept in")
        raise NonFiniteError(
            f"{msg}; {saved} {self.out_dir}/checkpoint.pt. Lower the LR, use train.amp=none, or "
            "resume with --resume --set train.nonfinite=skip to skip such batches")

    def fit(self) -> TrainResult:
        """Run (or finish) the training; returns the summary. Honors SIGTERM/SIGINT."""
        with GracefulStop() as stop:
            return self._fit(stop)

    def _fit(self, stop: GracefulStop) -> TrainResult:
        self._t_start = time.perf_counter()
        self.model.train()
        self._emit("on_train_start")
        if self.teacher is not None and self.teacher_acc is None:
            self.teacher_acc = self.evaluate(self.teacher)
            self.log(f"[{self.label}] teacher {self.cfg.teacher.arch} test acc {self.teacher_acc:.4f}")
        if self.method == "isl" or (self.cfg.data.augment == "none" and self.teacher is not None):
            t0 = time.perf_counter()
            self.teacher_train_logits()
            self.accum["teacher_cache"] += time.perf_counter() - t0
        every = self.cfg.train.checkpoint_every_steps
        if self._resume_state is None and self.global_step == 0:
            # A step-0 checkpoint: a run that fails or is killed early still has a good state.
            self.save_checkpoint("start")
        if self._stop_agreed(stop):
            self._preempt(stop, saved=True)
        bs, world = self.cfg.optim.batch_size, self.ctx.world_size
        dump = bool(os.environ.get("KDSEQ_TEST_DUMP_DIR"))
        for e in range(self.epoch, self.total_epochs):
            phase, kind, eip, plen = self.schedule[e]
            if kind == "curriculum" and self.scored_phase != phase:
                self._start_phase(phase)
                if self._stop_agreed(stop):
                    self._preempt(stop)
            order, admitted = self._epoch_order(e)
            seen = []
            self.train_loader.set_epoch(e)
            self.train_loader.set_order(order, start_batch=self.batch_in_epoch)
            t_epoch = time.perf_counter()
            bar = self._bar(self.steps_per_epoch, self.batch_in_epoch,
                            f"{self.label} ep {e + 1}/{self.total_epochs}")
            it = iter(self.train_loader)
            try:
                while True:
                    t0 = self.timer.now()
                    batch = next(it, None)
                    if batch is None:
                        break
                    self.timer.add("data", self.timer.now() - t0)
                    b = int(batch["labels"].numel())
                    weight = rank_loss_weight(
                        b, min(bs, len(order) - self.batch_in_epoch * bs), world)
                    if dump:
                        seen.append(batch["indices"].cpu().numpy())
                    value = self._train_step(batch, phase, weight)
                    if value is not None:
                        self.accum["loss_sum"] += value * b
                        self.accum["samples"] += b
                    self.accum["admitted_sum"] += float(admitted[self.batch_in_epoch]) / self.num_items
                    self.accum["steps"] += 1
                    self.batch_in_epoch += 1
                    self.global_step += 1
                    bar.update(1)
                    if value is not None:
                        bar.set_postfix(loss=f"{value:.4f}", refresh=False)
                    self._emit("on_step_end", self.global_step, value)
                    saved = False
                    if every and self.global_step % every == 0:
                        self._fold_times(t_epoch)
                        t_epoch = time.perf_counter()
                        self.save_checkpoint("interval")
                        saved = True
                    test_kill_hook("step", self.global_step)
                    if self._stop_agreed(stop):
                        # Signals only set a flag; the finished step is checkpointed here.
                        self._fold_times(t_epoch)
                        t_epoch = time.perf_counter()
                        self._preempt(stop, saved=saved)
            finally:
                bar.close()
                it.close()
            self._fold_times(t_epoch)
            if dump:
                test_dump_hook(f"epoch{e}", order=order, phase=np.int64(phase),
                               indices=np.concatenate(seen) if seen else np.zeros(0, np.int64),
                               lengths=np.array([len(x) for x in seen], dtype=np.int64))
            self._end_epoch(e)
            if self._stop_agreed(stop):
                self._preempt(stop)
        return self._finish()

    def _stop_agreed(self, stop: GracefulStop) -> bool:
        """Whether to stop now, agreed by all ranks: a signal seen by one rank after step k and
        by another after step k+1 must not leave one of them waiting in step k+1's all-reduce."""
        if not self.ctx.distributed:
            return stop.requested is not None
        if self.ctx.any_true(stop.requested is not None):
            if stop.requested is None:
                stop.requested = signal.SIGTERM  # stopped on another rank's signal
            return True
        return False

    def _fold_times(self, t_epoch: float) -> None:
        self.accum["train_time"] += time.perf_counter() - t_epoch
        for k, v in self.timer.reset().items():
            self.accum[k] += v

    def _preempt(self, stop: GracefulStop, saved: bool = False) -> None:
        if not saved:
            self.save_checkpoint("preempted")
        raise Preempted(f"[{self.label}] received {stop.name}: checkpoint saved in {self.out_dir} "
                        f"at step {self.global_step}; resume with the same command plus --resume")

    def _end_epoch(self, e: int) -> None:
        phase, kind, eip, plen = self.schedule[e]
        lr_used = self.lr
        self.scheduler.step()
        last = e + 1 == self.total_epochs
        acc = None
        t0 = time.perf_counter()
        if (e + 1) % self.cfg.train.eval_every_epochs == 0 or last:
            acc = self.evaluate()
            self.history.append((self.global_step, acc))
            if acc > self.best_acc or len(self.history) == 1:
                self.best_acc = acc
                if self.role == "teacher":
                    self.best_state = {k: v.detach().cpu().clone()
                                       for k, v in self.model.state_dict().items()}
        eval_s = time.perf_counter() - t0
        a = self.accum
        loss_sum, samples = self.ctx.reduce_sum([a["loss_sum"], a["samples"]])
        record = {
            "method": self.label, "phase": phase, "epoch": e + 1, "epoch_in_phase": eip + 1,
            "steps": self.global_step, "lr": lr_used,
            "train_loss": loss_sum / max(samples, 1), "test_acc": acc,
            "admitted_frac": a["admitted_sum"] / max(a["steps"], 1),
            "images_per_s": samples / max(a["train_time"], 1e-9),
            "wall_s": self.wall_before + self._wall_this_process(),
            # The model segment encloses the loss call; report them disjoint.
            "time_data": a["data"], "time_model": a["model"] - a["loss"], "time_loss": a["loss"],
            "time_scoring": a["scoring"],
            "time_teacher_cache": a["teacher_cache"], "time_eval": eval_s, "time_train": a["train_time"],
            "skipped_batches": self.skipped_batches,
        }
        if self.ctx.is_main:
            with open(os.path.join(self.out_dir, "metrics.jsonl"), "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record, default=_json_default) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        self.metrics_lines += 1
        self._emit("on_epoch_end", record)
        self.epoch, self.batch_in_epoch = e + 1, 0
        self.accum = self._new_accum()
        self.save_checkpoint("epoch end")

    # ------------------------------------------------------------------ outputs
    def _finish(self) -> TrainResult:
        wall = self.wall_before + self._wall_this_process()
        final_acc = self.history[-1][1] if self.history else self.evaluate()
        target = self.cfg.train.target_acc
        if target is not None and target > 1:
            target = target / 100.0  # accept percentages in the config
        if target is None and self.method == "kd" and self.role == "student":
            target = final_acc
        entry = {"test_acc": final_acc, "best_acc": self.best_acc, "steps": self.global_step,
                 "steps_to_target": steps_to_target(self.history, target),
                 "target_acc": target, "wall_s": wall, "epochs": self.total_epochs,
                 "arch": self.arch, "skipped_batches": self.skipped_batches}
        weights_name = "teacher.pt" if self.role == "teacher" else "student.pt"
        weights_path = os.path.join(self.out_dir, weights_name)
        if self.role == "teacher":
            summary = {"teacher": {**entry, "checkpoint": weights_path}, "methods": {}}
        else:
            summary = {"teacher": {"test_acc": self.teacher_acc, "arch": self.cfg.teacher.arch,
                                   "checkpoint": self.teacher_path},
                       "methods": {self.method: entry}}
        if self.ctx.is_main:
            state = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
            buf = io.BytesIO()
            torch.save(state, buf)
            atomic_write_bytes(buf.getvalue(), weights_path)
            if self.role == "teacher" and self.best_state is not None:
                buf = io.BytesIO()
                torch.save(self.best_state, buf)
                atomic_write_bytes(buf.getvalue(), os.path.join(self.out_dir, "teacher_best.pt"))
            write_json(summary, os.path.join(self.out_dir, "summary.json"))
            self._write_plots()
        self._emit("on_train_end", summary)
        return TrainResult(self.out_dir, summary, weights_path)

    def pacing_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(global step, admitted fraction) over the whole run, for the pacing plot."""
        steps, fracs = [], []
        s = 0
        for phase, kind, eip, plen in self.schedule:
            if kind == "curriculum":
                n = self.orders.admitted_counts(self.pacing, eip, plen) / self.num_items
            else:
                n = np.ones(self.steps_per_epoch)
            steps.append(s + 1 + np.arange(n.size))
            fracs.append(n)
            s += n.size
        return np.concatenate(steps), np.concatenate(fracs)

    def _write_plots(self) -> None:
        from . import reports

        records = reports.read_metrics(os.path.join(self.out_dir, "metrics.jsonl"))
        reports.plot_accuracy({self.label: records}, os.path.join(self.out_dir, "accuracy_vs_steps.png"))
        if self.method == "isl":
            steps, frac = self.pacing_curve()
            reports.plot_pacing(steps, frac, os.path.join(self.out_dir, "pacing.png"),
                                title=f"pacing: {self.cfg.curriculum.pacing} (b={self.pacing.start_frac},"
                                      f" a={self.pacing.full_at})")
            reports.plot_difficulty_histograms(self.out_dir, self.cfg.curriculum.measure,
                                               os.path.join(self.out_dir, "difficulty_hist.png"))


def steps_to_target(history: Iterable[tuple[int, float]], target: float | None) -> int | None:
    """First evaluated step whose test accuracy reaches ``target`` (None if never / no target)."""
    if target is None:
        return None
    for steps, acc in history:
        # A hair of tolerance: the kd baseline must reach its own final accuracy at its last step.
        if acc >= target - 1e-12:
            return int(steps)
    return None


# --------------------------------------------------------------------------------------------
# High-level entry points (used by the CLI)
# --------------------------------------------------------------------------------------------
def _callbacks(cfg: Config, out_dir: str, log, extra=()) -> list:
    cbs = [ConsoleLogger(log)]
    if cfg.train.tensorboard:
        cbs.append(TensorBoardLogger(os.path.join(out_dir, "tb")))
    return cbs + list(extra)


def train_teacher(cfg: Config, out_dir: str, *, resume=False, overwrite=False, quiet=False,
                  log=print, data: DataBundle | None = None, ctx=None) -> TrainResult:
    """Train ``cfg.teacher.arch`` with cross-entropy; writes ``out_dir/teacher.pt``."""
    ctx = ctx or setup_run(cfg.device, seed=cfg.seed, deterministic=cfg.deterministic)
    if resume and ctx.run_on_main(lambda: _is_complete(out_dir, "teacher", "ce", cfg)):
        return ctx.run_on_main(lambda: _completed_result(out_dir, "teacher.pt", log, "teacher"))
    t = Trainer(cfg, out_dir, role="teacher", resume=resume, overwrite=overwrite, quiet=quiet,
                callbacks=_callbacks(cfg, out_dir, log), log=log, data=data, ctx=ctx)
    return t.fit()


def distill(cfg: Config, out_dir: str, *, method: str | None = None, teacher=None, resume=False,
            overwrite=False, quiet=False, log=print, data: DataBundle | None = None,
            ctx=None) -> TrainResult:
    """Train the student with ``method`` (``ce``, ``kd`` or ``isl``) into ``out_dir``."""
    method = method or cfg.method
    ctx = ctx or setup_run(cfg.device, seed=cfg.seed, deterministic=cfg.deterministic)
    if resume and ctx.run_on_main(lambda: _is_complete(out_dir, "student", method, cfg)):
        return ctx.run_on_main(lambda: _completed_result(out_dir, "student.pt", log, method))
    t = Trainer(cfg, out_dir, method=method, teacher=teacher, resume=resume, overwrite=overwrite,
                quiet=quiet, callbacks=_callbacks(cfg, out_dir, log), log=log, data=data, ctx=ctx)
    return t.fit()


def _is_complete(out_dir: str, role: str, method: str, cfg: Config) -> bool:
    """A finished run with the same identity: resume has nothing left to do."""
    try:
        with open(os.path.join(out_dir, "run.json")) as fh:
            ident = json.load(fh)
        with open(os.path.join(out_dir, "checkpoint.pt"), "rb"):
            pass
    except (OSError, ValueError):
        return False
    if ident.get("role") != role or ident.get("method") != method or \
            ident.get("resume_hash") != config_hash(cfg, exclude=RESUME_IGNORED_KEYS):
        return False
    found = load_latest_checkpoint(out_dir, log=lambda m: None)
    if found is None:
        return False
    p = found[0]["progress"]
    total = cfg.optim.epochs if role == "student" else (cfg.teacher.epochs or cfg.optim.epochs)
    return p["epoch"] >= total and os.path.exists(os.path.join(out_dir, "summary.json"))


def _completed_result(out_dir: str, weights: str, log, label: str) -> TrainResult:
    with open(os.path.join(out_dir, "summary.json")) as fh:
        summary = json.load(fh)
    log(f"[{label}] already complete in {out_dir}; nothing to resume")
    return TrainResult(os.path.abspath(out_dir), summary, os.path.join(os.path.abspath(out_dir), weights))


def compare(cfg: Config, out_dir: str, *, methods: Sequence[str] = METHODS, teacher=None,
            resume=False, overwrite=False, quiet=False, log=print) -> dict:
    """Train the teacher if needed, then each method on the same config, seed and budget.

    Layout: ``out_dir/teacher/`` (when trained here), ``out_dir/<method>/`` per method, and in
    ``out_dir`` the combined ``summary.json``, ``metrics.jsonl`` and comparison plots.
    ``steps_to_target`` uses ``train.target_acc`` or, when null, the kd run's final accuracy.
    """
    from . import reports

    for m in methods:
        if m not in METHODS:
            raise ValueError(f"methods: unknown method {m!r}; valid: {', '.join(METHODS)}")
    os.makedirs(out_dir, exist_ok=True)
    ctx = setup_run(cfg.device, seed=cfg.seed, deterministic=cfg.deterministic)
    data = build_data(cfg)
    teacher = teacher or cfg.teacher.checkpoint
    teacher_entry = None
    if teacher is None and any(m != "ce" for m in methods):
        res = train_teacher(cfg, os.path.join(out_dir, "teacher"), resume=resume,
                            overwrite=overwrite, quiet=quiet, log=log, data=data, ctx=ctx)
        teacher = res.weights_path
        teacher_entry = res.summary["teacher"]
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
    target = cfg.train.target_acc
    if target is not None and target > 1:
        target /= 100.0
    if target is None and "kd" in summary["methods"]:
        target = summary["methods"]["kd"]["test_acc"]
    records = {m: reports.read_metrics(os.path.join(out_dir, m, "metrics.jsonl")) for m in results}
    for m, entry in summary["methods"].items():
        hist = [(r["steps"], r["test_acc"]) for r in records[m] if r["test_acc"] is not None]
        entry["target_acc"] = target
        entry["steps_to_target"] = steps_to_target(hist, target)
    if teacher_entry is not None:
        summary["teacher"] = teacher_entry
    write_json(summary, os.path.join(out_dir, "summary.json"))
    with open(os.path.join(out_dir, "metrics.jsonl"), "w", encoding="utf-8") as fh:
        for m in results:
            for r in records[m]:
                fh.write(json.dumps(r, default=_json_default) + "\n")
    reports.plot_accuracy(records, os.path.join(out_dir, "accuracy_vs_steps.png"), target=target)
    plots = [os.path.join(out_dir, "accuracy_vs_steps.png")]
    if "isl" in results:
        for name in ("pacing.png", "difficulty_hist.png"):
            src = os.path.join(out_dir, "isl", name)
            if os.path.exists(src):
                plots.append(src)
    summary_out = copy.deepcopy(summary)
    summary_out["plots"] = plots
    return summary_out
