"""One trainer for the three methods: ``ce`` (student alone), ``kd`` (Hinton KD), ``isl`` (ISL-KD).

This module is the orchestration: it wires the run together and drives the epochs. The rooms it
drives, one concern each:

- :mod:`.schedule` -- the epoch plan (warm-up | phases | final) and each epoch's index order;
- :mod:`.step` -- the device step (forward, loss, non-finite guard, fused optimizer update) that
  never waits for the GPU, and the device counters read at log intervals;
- :mod:`.run_dir` -- the run directory: identity, refusing another run, metrics, weights, summary;
- :mod:`.run_inputs` -- data splits, loaders, the teacher and its cached logits;
- :mod:`.progress` -- where the run stands (epoch, step, curriculum, history, best model);
- :mod:`.epoch_sums` -- the epoch's running sums (per rank) and its metrics record;
- :mod:`.runtime` -- device, seeding, signals, checkpoint files, ``torch.distributed``;
- :mod:`.callbacks` -- console and TensorBoard logging;
- :mod:`.train_settings` -- the ``auto`` training settings decided for the device;
- :mod:`.runs` -- ``train_teacher`` / ``distill`` / ``compare``, the calls behind the CLI.

Every run is resumable bit-exactly (CPU, deterministic mode): the checkpoint holds the student,
optimizer, LR scheduler, loss scale, all RNG states, the position inside the epoch, the current
phase's scores and instance sequence, the running sums of the epoch's metrics and a hash of the
config. Epoch orders are pure functions of (seed, phase, epoch, sequence), so they are regenerated
rather than stored.

Under ``torchrun`` the same code runs on every rank with the student wrapped in
``DistributedDataParallel``: ``optim.batch_size`` is the *global* batch (each rank trains on its
``numpy.array_split`` share of every global batch; the LR is never rescaled), scoring and the
teacher-logit pass are split across ranks and summed into the full matrices, every rank builds the
identical instance sequence, and evaluation counts are summed over ranks.
"""
from __future__ import annotations

import math
import os
import sys
import time
from typing import Callable, Sequence

import numpy as np
import torch

from ._extension import check_cuda_kernels
from .callbacks import Callback, ConsoleLogger, TensorBoardLogger
from .config import Config, config_hash, phase_epochs, validate_config
from .curriculum import InstanceSequence
from .epoch_sums import EpochSums
from .nonfinite import RejectedSteps
from .progress import RunProgress
from .reports import accuracy_target, steps_to_target
from .run_dir import RESUME_IGNORED_KEYS, RunDirectory, RunDirError, TrainResult, check_resumable, resume_hash
from .run_inputs import (DataBundle, build_data, check_teacher_argument, load_teacher, make_loader, open_teacher,
                         ordered_batch_size, rank_loss_weight, shared_teacher_logits)
from .runtime import (GracefulStop, RunContext, SegmentTimer, capture_rng_state, load_latest_checkpoint,
                      restore_rng_state, save_checkpoint, setup_run, test_dump_hook, test_kill_hook)
from .schedule import EpochPlan
from .step import BufferGuard, DeviceStep, match_state_layouts
from .train_settings import resolve_train_settings

__all__ = [
    "Trainer", "TrainResult", "Callback", "ConsoleLogger", "TensorBoardLogger", "Preempted",
    "NonFiniteError", "RunDirError", "METHODS", "RESUME_IGNORED_KEYS", "build_data",
    "load_teacher", "ordered_batch_size",
    "rank_loss_weight", "shared_teacher_logits", "steps_to_target", "resolve_train_settings",
]

METHODS = ("ce", "kd", "isl")
# 2: the device step's loss-scale state replaced GradScaler's; train accuracy in the epoch sums.
CHECKPOINT_FORMAT = 2


def __getattr__(name: str):
    # The entry points live in .runs (which imports this module); kept importable from here.
    if name in ("train_teacher", "distill", "compare"):
        from . import runs

        return getattr(runs, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class Preempted(Exception):
    """Raised after a SIGTERM/SIGINT was honoured: the step finished and a checkpoint was saved.
    ``result``: the finished run's results when the signal came while they were being written."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or gradient; the last good state was checkpointed before raising."""


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
        sync_timing: synchronize the GPU at segment ends so the time shares are device time
            (benchmarks; slows training).
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
        # A Config changed after loading (cfg.optim.lr = ...) is checked again here.
        validate_config(cfg, methods=(method,))
        if not isinstance(out_dir, (str, os.PathLike)) or not os.fspath(out_dir):
            raise ValueError(f"out_dir must be a non-empty path, got {out_dir!r}")
        check_teacher_argument(teacher)
        callbacks = () if callbacks is None else callbacks
        if not isinstance(callbacks, (list, tuple)) or not all(isinstance(cb, Callback) for cb in callbacks):
            raise TypeError("callbacks must be a list of kdseq_fast.callbacks.Callback instances, got "
                            f"{callbacks!r}")
        self.cfg, self.method, self.role = cfg, method, role
        self.out_dir = os.path.abspath(out_dir)
        self.label = label or ("teacher" if role == "teacher" else method)
        self.log = log
        self.quiet = quiet
        self.ctx = ctx or setup_run(cfg.device, seed=cfg.seed, deterministic=cfg.deterministic)
        self.device = self.ctx.device
        if method != "ce":
            check_cuda_kernels(self.device)  # before any work, not at the first kd_loss launch
        self.callbacks = list(callbacks)
        self.settings = resolve_train_settings(cfg, self.device, distributed=self.ctx.distributed)
        self.run_dir = RunDirectory(self.out_dir, is_main=self.ctx.is_main)

        self._plan_epochs()
        # Rank 0 alone reads the directory (the others would race its writes) and shares the
        # verdict, so a refused directory stops every rank with the same error.
        self.ctx.run_on_main(lambda: self.run_dir.check(cfg, role, method, resume=resume,
                                                        overwrite=overwrite))
        try:
            self._build_after_check(cfg, data, teacher, sync_timing, resume)
        except BaseException:
            self.run_dir.unlock()  # a traceback kept alive (a notebook) must not keep the directory
            raise

    def _build_after_check(self, cfg, data, teacher, sync_timing, resume) -> None:
        self._build_data(data)
        guard = self._build_student()
        teacher_fwd = self._build_teacher(teacher)
        self._build_step(guard, teacher_fwd, sync_timing)
        self._init_progress()
        from .scoring import teacher_fingerprint

        self.teacher_fingerprint = teacher_fingerprint(self.teacher) if self.teacher is not None else None

        if self.ctx.is_main:
            os.makedirs(self.out_dir, exist_ok=True)
        if resume:
            self._load_resume_state()
        if self._resume_state is None:
            self.run_dir.init(cfg, self._run_identity())

    # ------------------------------------------------------------------ building the run
    def _plan_epochs(self) -> None:
        cfg = self.cfg
        if self.role == "teacher":
            self.total_epochs = cfg.teacher.epochs or cfg.optim.epochs
            self.base_lr = cfg.teacher.lr or cfg.optim.lr
            # A shorter teacher schedule keeps the decay points at the same fractions, and every
            # decay: points that round to the same epoch stay repeated (MultiStepLR applies each).
            scale = self.total_epochs / cfg.optim.epochs
            self.milestones = sorted(max(1, math.floor(m * scale + 0.5)) for m in cfg.optim.lr_decay_epochs)
            self.arch = cfg.teacher.arch
        else:
            if self.method == "isl":
                phase_epochs(cfg)  # a config loaded for ce/kd alone may not tile the curriculum
            self.total_epochs = cfg.optim.epochs
            self.base_lr = cfg.optim.lr
            self.milestones = list(cfg.optim.lr_decay_epochs)
            self.arch = cfg.student.arch

    def _build_data(self, data: DataBundle | None) -> None:
        cfg = self.cfg
        if cfg.optim.batch_size < self.ctx.world_size:
            raise ValueError(f"optim.batch_size={cfg.optim.batch_size} is the global batch and must "
                             f"be at least the number of processes ({self.ctx.world_size})")
        self.data = data or build_data(cfg, progress=False if self.quiet else None)
        self.num_items = len(self.data.train)
        self.num_classes = self.data.num_classes
        shard = self.ctx.shard
        eval_bs = self.settings["eval_batch_size"]
        self.train_loader = make_loader(cfg, self.data.train, self.ctx, augment=True, seed=cfg.seed,
                                        shard=shard)
        # Evaluation is sharded too: each rank counts its share and evaluate() sums the counts.
        self.test_loader = make_loader(
            cfg, self.data.test, self.ctx, augment=False, seed=cfg.seed, shard=shard,
            batch_size=ordered_batch_size(len(self.data.test), eval_bs, self.ctx.world_size))
        self.test_loader.set_order(np.arange(len(self.data.test)))
        self.plan = EpochPlan(cfg, method=self.method, total_epochs=self.total_epochs,
                              num_items=self.num_items)
        self.schedule = self.plan.epochs
        self.orders, self.pacing = self.plan.orders, self.plan.pacing
        self.steps_per_epoch = self.plan.steps_per_epoch

    @property
    def _memory_format(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def _compile(self, module: torch.nn.Module) -> torch.nn.Module:
        if not self.settings["compile"]:
            return module
        mode = self.settings["compile_mode"]
        # dynamic=False: a run meets few batch sizes (the batch, an epoch's shorter last batch, the
        # evaluation batches), and each gets static kernels. By default the first recompile (the
        # last batch) marks the batch dynamic, and every later full batch then runs dynamic-shape
        # kernels, which reduce BatchNorm's statistics in another order than the captured graph.
        return torch.compile(module, dynamic=False, **({} if mode == "default" else {"mode": mode}))

    def _build_student(self) -> BufferGuard:
        """The student, its DDP wrapper and compiled form; returns its BatchNorm buffer guard."""
        from .models import get_model
        from .runtime import seed_everything

        # Seed right before initialisation so the initial student depends on the seed alone
        # (not on what dataset loading consumed): every method starts from the same weights.
        seed_everything(self.cfg.seed)
        self.model = get_model(self.arch, self.num_classes, image_size=self.cfg.data.image_size,
                               in_channels=self.data.in_channels)
        self.channels_last = self.settings["channels_last"]
        self.model.to(self.device, memory_format=self._memory_format)
        # Before any wrapper holds the buffers: the guard re-points them into one flat tensor.
        guard = BufferGuard(self.model)
        net = self.model
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            # Construction broadcasts rank 0's weights and buffers; every forward re-broadcasts
            # the BatchNorm running statistics, so the ranks' models stay identical. Batch
            # statistics are per rank (no SyncBatchNorm), as in torchvision's reference recipes.
            net = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.ddp = net if self.ctx.distributed else None
        self.train_model = self._compile(net)
        return guard

    def _build_teacher(self, teacher) -> torch.nn.Module | None:
        """The teacher (kd and isl) from a module or checkpoint path; returns the module the step
        calls (compiled when train.compile is on)."""
        self.teacher = None
        self.teacher_path = None
        if self.method not in ("kd", "isl"):
            return None
        self.teacher, self.teacher_path = open_teacher(self.cfg, teacher, self.method, self.num_classes,
                                                       in_channels=self.data.in_channels)
        self.teacher.to(self.device, memory_format=self._memory_format)
        return self._compile(self.teacher)

    def _build_step(self, guard: BufferGuard, teacher_fwd, sync_timing: bool) -> None:
        """Optimizer, LR schedule and the device step."""
        o, loss = self.cfg.optim, self.cfg.loss
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.base_lr,
                                         momentum=o.momentum, weight_decay=o.weight_decay,
                                         nesterov=o.nesterov, fused=self.settings["fused_optimizer"])
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, milestones=self.milestones, gamma=o.lr_decay_rate)
        self.amp = self.settings["amp"]
        self.step = DeviceStep(
            model=self.model, train_model=self.train_model, optimizer=self.optimizer,
            device=self.device, amp=self.amp, method=self.method, temperature=loss.temperature,
            kd_weight=loss.kd_weight, ce_weight=loss.ce_weight, teacher=teacher_fwd,
            channels_last=self.channels_last, guard=guard,
            all_reduce=self.ctx.all_reduce_max if self.ctx.distributed else None,
            cuda_graphs=self.settings["cuda_graphs"])
        self.amp_dtype = self.step.amp_dtype
        self.timer = SegmentTimer(self.device, sync=sync_timing)
        self.log_every = self.settings["log_every_steps"]

    @property
    def resumed(self) -> bool:
        """Whether this run continues from a checkpoint (``resume=True`` found one)."""
        return self._resume_state is not None

    def _init_progress(self) -> None:
        """The state of a run at its start: where it stands, the epoch's sums, empty caches."""
        self.progress = RunProgress()
        self.sums = EpochSums()
        self._teacher_train_logits = None
        self._score_loader_obj = None
        self._resume_state = None
        self._last_checkpoint_step = None
        self.rejected = RejectedSteps()
        self._compiled_once = False

    # ------------------------------------------------------------------ identity and checkpoints
    @property
    def _resume_hash(self) -> str:
        return resume_hash(self.cfg, self.method)

    def _run_identity(self) -> dict:
        return {"role": self.role, "method": self.method, "resume_hash": self._resume_hash,
                "config_hash": config_hash(self.cfg), "teacher": self.teacher_path}

    def _checkpoint_state(self, sums: dict) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "role": self.role, "method": self.method,
            "config": self.cfg.to_dict(), "resume_hash": self._resume_hash,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "step": self.step.state_dict(),
            "rng": capture_rng_state(),
            **self.progress.state_dict(wall_s=self._wall_s()),
            "accum": sums,
            "teacher_fingerprint": self.teacher_fingerprint,
        }

    def _wall_s(self) -> float:
        """The run's training wall time: earlier processes' plus this one's."""
        this = time.perf_counter() - self._t_start if getattr(self, "_t_start", None) else 0.0
        return self.progress.wall_before + this

    def save_checkpoint(self, reason: str = "") -> None:
        self._fold()
        if not self._weights_finite():
            # Never over a good checkpoint (nor, after the last epoch's, into student.pt): a loss
            # can stay finite for the step whose update overflowed the weights.
            self._stop_for_nonfinite_weights(f"at step {self.progress.global_step} ({reason or 'a'} checkpoint)")
        self._write_checkpoint()

    def _write_checkpoint(self) -> None:
        """The checkpoint write itself, for a caller that has folded and checked the weights."""
        # Every rank calls this at the same points (the epoch sums gather the ranks' counts).
        sums = self.sums.state_dict(self.ctx)
        if self.ctx.is_main:
            save_checkpoint(self._checkpoint_state(sums), self.out_dir)
        self._last_checkpoint_step = self.progress.global_step

    def _load_resume_state(self) -> None:
        # Rank 0 reads the checkpoint and sends it to the others: one consistent state even if
        # rank 0 falls back to checkpoint.prev.pt, and no shared disk needed across nodes.
        found = self.ctx.run_on_main(lambda: load_latest_checkpoint(self.out_dir, log=self.log))
        if found is None:
            self.log(f"[{self.label}] no checkpoint in {self.out_dir}; starting from scratch")
            return
        state, path = found
        check_resumable(state, path, cfg=self.cfg, role=self.role, method=self.method,
                        checkpoint_format=CHECKPOINT_FORMAT, teacher_fingerprint=self.teacher_fingerprint)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        match_state_layouts(self.optimizer)  # saved by a run with another channels-last choice
        self.scheduler.load_state_dict(state["scheduler"])
        self.step.load_state_dict(state["step"])
        # Last, after everything that consumed random numbers while building this trainer.
        restore_rng_state(state["rng"])
        self.progress = p = RunProgress.from_state(state)
        self.step.set_step_count(p.global_step)
        self.sums.load_state_dict(state["accum"], self.ctx)
        self._resume_state = state
        self._last_checkpoint_step = p.global_step
        # Epoch records written after this checkpoint will be produced again.
        self.run_dir.truncate_metrics(p.metrics_lines)
        where = (f"all {self.total_epochs} epochs done, writing the results" if p.epoch >= self.total_epochs
                 else f"epoch {p.epoch + 1}/{self.total_epochs}, batch {p.batch_in_epoch}")
        self.log(f"[{self.label}] resuming from {os.path.basename(path)}: {where}, step {p.global_step}")

    # ------------------------------------------------------------------ helpers
    def _emit(self, hook: str, *args) -> None:
        if not self.ctx.is_main:
            return
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def _autocast(self):
        return self.step.autocast()

    @property
    def _progress(self) -> bool:
        # Bars only for a person watching: not in logs, not on other ranks, not with --quiet.
        return not self.quiet and self.ctx.is_main and sys.stderr.isatty()

    def _bar(self, total: int, initial: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, leave=False, disable=not self._progress,
                    dynamic_ncols=True)

    def _to_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.step.to_input(x)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # ------------------------------------------------------------------ evaluation and scoring
    def _same_student_on_every_rank(self) -> None:
        """Rank 0's BatchNorm statistics on every rank. DDP broadcasts them at the start of each
        training forward, and then every rank updates them with its own batch: without this, each
        rank would evaluate and score its shard with different statistics than the student that
        rank 0 checkpoints (and a resumed run, which starts from rank 0's, would differ)."""
        if self.ctx.distributed:
            self.ctx.broadcast_(self.step.guard.flat)  # the model's buffers, as one flat tensor a dtype

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module | None = None) -> float:
        """Top-1 accuracy on the test split, as a fraction (one host read at the end)."""
        if model is None or model is self.model:
            self._same_student_on_every_rank()
        model = model or self.model
        was_training = model.training
        model.eval()
        counts = torch.zeros(2, dtype=torch.int64, device=self.device)
        bar = self._bar(len(self.test_loader), 0, f"{self.label} eval")
        try:
            for batch in self.test_loader:
                bar.update()
                with self._autocast():
                    logits = model(self._to_input(batch["images"]))
                labels = batch["labels"].to(self.device, non_blocking=True)
                counts[0] += (logits.argmax(1) == labels).sum()
                counts[1] += labels.numel()
        finally:
            bar.close()
            model.train(was_training)
        correct, total = self.ctx.reduce_sum(counts.tolist())
        return correct / max(total, 1)

    def _score_loader(self):
        if self._score_loader_obj is None:
            # Sharded: each rank scores its part and score_dataset/compute_logits sum the parts.
            loader = make_loader(self.cfg, self.data.train, self.ctx, augment=False,
                                 seed=self.cfg.seed, shard=self.ctx.shard,
                                 batch_size=ordered_batch_size(self.num_items,
                                                               self.settings["eval_batch_size"],
                                                               self.ctx.world_size))
            loader.set_order(np.arange(self.num_items))
            self._score_loader_obj = loader
        return self._score_loader_obj

    def teacher_train_logits(self) -> torch.Tensor:
        """Teacher logits on the un-augmented training set, from the on-disk cache: on the
        training device when they fit in a quarter of the free GPU memory, so the per-step gather
        never crosses the bus, else in host memory. The host copy is then dropped (at 1.28M
        images and 1000 classes it is 4.8 GiB, in every process of a node)."""
        if self._teacher_train_logits is None:
            from .scoring import TeacherLogitCache

            cache_dir = self.cfg.train.teacher_cache_dir or os.path.join(self.out_dir, "cache")
            cache = TeacherLogitCache(cache_dir, dtype=self.cfg.train.teacher_cache_dtype)
            self._teacher_train_logits = shared_teacher_logits(
                self.ctx, cache, self.teacher, self._score_loader(), num_items=self.num_items,
                key=self.data.key, device=self.device, amp=self.amp, progress=self._progress)
            table = self._teacher_train_logits
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                if table.numel() * table.element_size() <= free // 4:
                    # Not non_blocking: the host copy is released at once, which a pending copy
                    # out of pageable memory must not outlive.
                    table = self._teacher_train_logits = table.to(self.device)
                else:
                    self.log(f"[{self.label}] note: teacher logits ({table.numel() * table.element_size() / 2**30:.1f} "
                             "GiB) stay in host memory; each step gathers them through the host")
            self.step.set_teacher_logits(table, use_cached=self.cfg.data.augment == "none")
        return self._teacher_train_logits

    def score_snapshot(self) -> torch.Tensor:
        """Score every training instance with a frozen snapshot of the student -> (N, 6)."""
        from .scoring import score_dataset

        self.teacher_train_logits()
        # Scoring runs in eval mode under no_grad and leaves the weights untouched, so the live
        # model *is* the snapshot; a deepcopy would only cost memory.
        self._same_student_on_every_rank()
        was_training = self.model.training
        self.model.eval()
        try:
            scores = score_dataset(self.model, self._score_loader(), self.step.teacher_logits,
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
        self.progress.sequence, self.progress.scored_phase = seq.sequence, phase
        self.sums.add_time("scoring", time.perf_counter() - t0)
        self.run_dir.save_npy(f"phase_{phase}_order.npy", seq.sequence)
        self.run_dir.save_npy(f"phase_{phase}_scores.npy", scores.numpy())
        self._emit("on_phase_start", phase, seq.sequence, scores)
        test_dump_hook(f"phase{phase}_sequence", sequence=seq.sequence)
        test_kill_hook("scoring", phase)
        self.save_checkpoint("phase boundary")

    # ------------------------------------------------------------------ device reads
    def _fold(self) -> None:
        """Moves the device counters into the epoch sums (one host read)."""
        r = self.step.fold()
        self.sums.add_read(r)
        self.rejected.add_read(r)

    def _handle_rejected(self, bar=None) -> None:
        """Reports the steps the non-finite guard rejected since the last read: a warning with
        ``train.nonfinite=skip``, else a checkpoint of the last good state and NonFiniteError."""
        found = self.rejected.take()
        if found is None:
            loss = self.sums.mean_loss()
            if bar is not None and loss is not None:
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            return
        bad, msg = found
        self.progress.skipped_batches += bad
        if not self._weights_finite():
            # An earlier update overflowed the weights while its loss and gradient were still
            # finite: every later batch is then non-finite, and skipping them cannot help.
            self._stop_for_nonfinite_weights(msg)
        if self.cfg.train.nonfinite == "skip":
            self.log(f"[{self.label}] warning: {msg}; batch skipped (train.nonfinite=skip)")
            return
        self._write_checkpoint()  # the weights were just checked
        raise NonFiniteError(
            f"{msg}; the last good state (step {self.progress.global_step}) is saved in {self.out_dir}/"
            "checkpoint.pt. Lower the LR, use train.amp=none, or resume with --resume --set "
            "train.nonfinite=skip to skip such batches")

    def _weights_finite(self) -> bool:
        """Parameters and buffers all finite, agreed by every rank: BatchNorm's running statistics
        differ between ranks, and a rank that stopped alone would leave the others in a collective."""
        return not self.ctx.any_true(not self.step.params_finite())

    def _stop_for_nonfinite_weights(self, what: str) -> None:
        """The weights are non-finite: keep the last checkpoint (never overwrite it with them) and
        stop, whatever train.nonfinite says."""
        raise NonFiniteError(
            f"{what}; the weights are non-finite (an update overflowed them: the LR is too high for "
            f"this model and precision), so the checkpoint from step {self._last_checkpoint_step} was "
            f"kept in {self.out_dir}/checkpoint.pt. Lower the LR or use train.amp=none; skipping "
            "batches (train.nonfinite=skip) cannot help")

    # ------------------------------------------------------------------ training
    def fit(self) -> TrainResult:
        """Run (or finish) the training; returns the summary. Honors SIGTERM/SIGINT."""
        try:
            with GracefulStop() as stop:
                return self._fit(stop)
        except BaseException as exc:
            if not isinstance(exc, Preempted) or exc.result is None:  # else on_train_end ran
                try:
                    self._emit("on_train_stopped", exc)
                except Exception as cleanup:  # the stop's own error is the one to report
                    self.log(f"[{self.label}] note: a callback failed while stopping: {cleanup!r}")
            raise
        finally:
            self.run_dir.unlock()  # the directory is free for another process (e.g. a --resume)

    def _fit(self, stop: GracefulStop) -> TrainResult:
        self._t_start = time.perf_counter()
        self.model.train()
        self._emit("on_train_start")
        if self._stop_agreed(stop, at_read=True):
            # A signal while the run was set up: stop before the teacher's passes, which take
            # minutes on real data (a fresh run's checkpoint then has no teacher accuracy yet; the
            # resumed run measures it).
            self._preempt(stop, saved=self._resume_state is not None)
        self._prepare_teacher()
        if self._resume_state is None and self.progress.global_step == 0:
            # A step-0 checkpoint: a run that fails or is killed early still has a good state.
            self.save_checkpoint("start")
        if self._stop_agreed(stop, at_read=True):
            self._preempt(stop, saved=True)
        for e in range(self.progress.epoch, self.total_epochs):
            self._train_epoch(e, stop)
            self._end_epoch(e)  # ends with a checkpoint: a preemption here needs no second one
            if self._stop_agreed(stop, at_read=True):
                self._preempt(stop, saved=True)
        result = self._finish()
        if self._stop_agreed(stop, at_read=True):
            # The signal came while the results were written: they are complete, but what the
            # caller would start next (compare's next method) must not start.
            raise Preempted(f"[{self.label}] received {stop.name} while writing the results: the run is "
                            f"complete in {self.out_dir}; run the same command with --resume to go on",
                            result=result)
        return result

    def _prepare_teacher(self) -> None:
        """The teacher's test accuracy (once per run) and, where the run uses them, its cached
        logits on the training set."""
        prog = self.progress
        if self.teacher is not None and prog.teacher_acc is None:
            prog.teacher_acc = self.evaluate(self.teacher)
            self.log(f"[{self.label}] teacher {self.cfg.teacher.arch} test acc {prog.teacher_acc:.4f}")
        if self.method == "isl" or (self.cfg.data.augment == "none" and self.teacher is not None):
            t0 = time.perf_counter()
            self.teacher_train_logits()
            self.sums.add_time("teacher_cache", time.perf_counter() - t0)

    def _train_epoch(self, e: int, stop: GracefulStop) -> None:
        """The steps of epoch ``e`` from the batch the run stands at (a phase's first epoch scores
        the snapshot first), with the device reads, interval checkpoints and preemption on the way."""
        prog = self.progress  # mutated in place
        # For the skip-mode guard at the epoch's end: only an epoch run from its first batch here.
        self._epoch_mark = (prog.global_step, prog.skipped_batches) if prog.batch_in_epoch == 0 else None
        every = self.cfg.train.checkpoint_every_steps
        bs, world = self.cfg.optim.batch_size, self.ctx.world_size
        dump = bool(os.environ.get("KDSEQ_TEST_DUMP_DIR"))
        phase, kind, _, _ = self.schedule[e]
        if kind == "curriculum" and prog.scored_phase != phase:
            self._start_phase(phase)  # ends with a checkpoint, as _end_epoch does
            if self._stop_agreed(stop, at_read=True):
                self._preempt(stop, saved=True)
        order, admitted = self.plan.order(e, prog.sequence)
        seen = []
        self.train_loader.set_epoch(e)
        # A run resumed on another number of ranks may have one batch fewer in this epoch (the
        # loader drops a last batch smaller than the world): then the epoch is already done.
        self.train_loader.set_order(order, start_batch=min(prog.batch_in_epoch,
                                                           self.train_loader.batches_in(order)))
        t_epoch = time.perf_counter()
        bar = self._bar(self.steps_per_epoch, prog.batch_in_epoch,
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
                weight = rank_loss_weight(b, min(bs, len(order) - prog.batch_in_epoch * bs), world)
                if dump:
                    seen.append(batch["indices"].cpu().numpy())
                first_compile = self.settings["compile"] and not self._compiled_once
                tc = time.perf_counter()
                loss = self.step.run(batch, weight, self.timer)
                if first_compile:
                    # The first compiled step pays for compilation: reported apart.
                    if self.device.type == "cuda":
                        torch.cuda.synchronize(self.device)
                    self.sums.add_time("compile", time.perf_counter() - tc)
                    self._compiled_once = True
                self.rejected.record(prog.global_step + 1, phase, e, prog.batch_in_epoch, batch["indices"])
                self.sums.add_step(float(admitted[prog.batch_in_epoch]) / self.num_items)
                prog.next_batch()
                bar.update(1)
                self._emit("on_step_end", prog.global_step, loss)
                read = prog.global_step % self.log_every == 0
                saved = False
                if every and prog.global_step % every == 0:
                    self._fold_times(t_epoch)
                    t_epoch = time.perf_counter()
                    self._fold()
                    self._handle_rejected(bar)
                    self.save_checkpoint("interval")
                    saved = True
                elif read:
                    self._fold()
                    self._handle_rejected(bar)
                test_kill_hook("step", prog.global_step)
                if self._stop_agreed(stop, at_read=read or saved):
                    # Signals only set a flag; the finished step is checkpointed here.
                    self._fold()
                    self._handle_rejected()
                    self._fold_times(t_epoch)
                    t_epoch = time.perf_counter()
                    self._preempt(stop, saved=saved)
        finally:
            bar.close()
            it.close()
        self._fold()
        self._handle_rejected()
        self._fold_times(t_epoch)
        if dump:
            test_dump_hook(f"epoch{e}", order=order, phase=np.int64(phase),
                           indices=np.concatenate(seen) if seen else np.zeros(0, np.int64),
                           lengths=np.array([len(x) for x in seen], dtype=np.int64))

    def _stop_agreed(self, stop: GracefulStop, at_read: bool = False) -> bool:
        """Whether to stop now, agreed by all ranks: a signal seen by one rank after step k and
        by another after step k+1 must not leave one of them waiting in step k+1's all-reduce.
        Under torch.distributed the ranks compare flags only where they read the device anyway
        (``at_read``), so preemption lands within ``train.log_every_steps`` steps."""
        if not self.ctx.distributed:
            return stop.requested is not None
        if not at_read:
            return False
        agreed = self.ctx.max_int(stop.requested or 0)  # the signal's number travels with it
        if agreed:
            if stop.requested is None:
                stop.request(agreed)  # stopped on another rank's signal
            return True
        return False

    def _fold_times(self, t_epoch: float) -> None:
        self.sums.add_time("train_time", time.perf_counter() - t_epoch)
        self.sums.add_times(self.timer.reset())

    def _preempt(self, stop: GracefulStop, saved: bool = False) -> None:
        if not saved:
            self.save_checkpoint("preempted")
        raise Preempted(f"[{self.label}] received {stop.name}: checkpoint saved in {self.out_dir} "
                        f"at step {self.progress.global_step}; resume with the same command plus --resume")

    def _end_epoch(self, e: int) -> None:
        phase, kind, eip, plen = self.schedule[e]
        lr_used = self.lr
        self.scheduler.step()
        last = e + 1 == self.total_epochs
        acc = None
        t0 = time.perf_counter()
        if (e + 1) % self.cfg.train.eval_every_epochs == 0 or last:
            acc = self.evaluate()
            if self.progress.record_eval(acc) and self.role == "teacher":
                self.progress.best_state = {k: v.detach().cpu().clone()
                                            for k, v in self.model.state_dict().items()}
        eval_s = time.perf_counter() - t0
        record = {
            "method": self.label, "phase": phase, "epoch": e + 1, "epoch_in_phase": eip + 1,
            "steps": self.progress.global_step, "lr": lr_used, "test_acc": acc,
            **self.sums.record(self.ctx),  # training loss and accuracy, throughput, time segments
            "wall_s": self._wall_s(), "time_eval": eval_s, "skipped_batches": self.progress.skipped_batches,
        }
        self.run_dir.append_metrics(record)
        self.progress.metrics_lines += 1
        self._emit("on_epoch_end", record)
        test_kill_hook("epoch_end", e + 1)
        self.progress.epoch, self.progress.batch_in_epoch = e + 1, 0
        self.sums.reset()
        steps = self.progress.global_step - self._epoch_mark[0] if self._epoch_mark else 0
        if steps >= 2 and self.progress.skipped_batches - self._epoch_mark[1] == steps:
            # train.nonfinite=skip is for the odd bad batch: a run that skips them all has stopped.
            raise NonFiniteError(
                f"every batch of epoch {e + 1} ({steps}) was non-finite and skipped (train.nonfinite=skip): "
                f"the run no longer learns; the checkpoint from step {self._last_checkpoint_step} was kept in "
                f"{self.out_dir}/checkpoint.pt. Lower the LR or use train.amp=none")
        self.save_checkpoint("epoch end")

    # ------------------------------------------------------------------ outputs
    def _finish(self) -> TrainResult:
        wall = self._wall_s()
        final_acc = self.progress.history[-1][1] if self.progress.history else self.evaluate()
        target = accuracy_target(self.cfg.train.target_acc)
        if target is None and self.method == "kd" and self.role == "student":
            target = final_acc
        entry = {"test_acc": final_acc, "best_acc": self.progress.best_acc, "steps": self.progress.global_step,
                 "steps_to_target": steps_to_target(self.progress.history, target),
                 "target_acc": target, "wall_s": wall, "epochs": self.total_epochs,
                 "arch": self.arch, "skipped_batches": self.progress.skipped_batches}
        weights_name = "teacher.pt" if self.role == "teacher" else "student.pt"
        if self.role == "teacher":
            summary = {"teacher": {**entry, "checkpoint": self.run_dir.file(weights_name)}, "methods": {}}
        else:
            summary = {"teacher": {"test_acc": self.progress.teacher_acc, "arch": self.cfg.teacher.arch,
                                   "checkpoint": self.teacher_path},
                       "methods": {self.method: entry}}
        weights_path = self.run_dir.save_weights(weights_name, self.model.state_dict())
        if self.role == "teacher" and self.progress.best_state is not None:
            self.run_dir.save_weights("teacher_best.pt", self.progress.best_state)
        # summary.json marks the run complete (what --resume skips): everything else comes first.
        if self.ctx.is_main:
            self._write_plots()
        self.run_dir.write_json("summary.json", summary)
        self._emit("on_train_end", summary)
        return TrainResult(self.out_dir, summary, weights_path)

    def pacing_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(global step, admitted fraction) over the whole run, for the pacing plot."""
        return self.plan.pacing_curve()

    def _write_plots(self) -> None:
        from . import reports

        records = reports.read_metrics(self.run_dir.file("metrics.jsonl"))
        reports.plot_accuracy({self.label: records}, self.run_dir.file("accuracy_vs_steps.png"))
        if self.method == "isl":
            steps, frac = self.pacing_curve()
            reports.plot_pacing(steps, frac, self.run_dir.file("pacing.png"),
                                title=f"pacing: {self.cfg.curriculum.pacing} (b={self.pacing.start_frac},"
                                      f" a={self.pacing.full_at})")
            reports.plot_difficulty_histograms(self.out_dir, self.cfg.curriculum.measure,
                                               self.run_dir.file("difficulty_hist.png"))
