"""Callbacks the trainer calls on the main process: a console line per epoch, TensorBoard scalars.

Write your own by subclassing :class:`Callback` and overriding any subset of its hooks; pass them
as ``Trainer(..., callbacks=[...])``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

if TYPE_CHECKING:  # pragma: no cover
    from .trainer import Trainer

__all__ = ["Callback", "ConsoleLogger", "TensorBoardLogger"]


class Callback:
    """Hooks the trainer calls; override any subset. Only called on the main process."""

    def on_train_start(self, trainer: "Trainer") -> None: ...
    def on_phase_start(self, trainer: "Trainer", phase: int, sequence: np.ndarray,
                       scores: torch.Tensor) -> None: ...
    # ``loss`` is the batch's mean loss as a 0-dim tensor on the training device. Reading it
    # (float(loss)) waits for the GPU: do that every few hundred steps at most.
    def on_step_end(self, trainer: "Trainer", step: int, loss: torch.Tensor) -> None: ...
    def on_epoch_end(self, trainer: "Trainer", record: dict) -> None: ...
    def on_train_end(self, trainer: "Trainer", summary: dict) -> None: ...
    # Instead of on_train_end when fit stops early (preemption, a non-finite stop, an error):
    # release what on_train_start opened.
    def on_train_stopped(self, trainer: "Trainer", error: BaseException) -> None: ...


class ConsoleLogger(Callback):
    """One concise line per epoch, e.g.
    ``[isl] phase 1 epoch 7/12 step 1234 lr 0.05 loss 0.8123 acc 0.9444 admit 0.60 1234 img/s``."""

    def __init__(self, log: Callable[[str], None] = print):
        self.log = log

    def on_epoch_end(self, trainer, record):
        acc = "  -   " if record["test_acc"] is None else f"{record['test_acc']:.4f}"
        loss = "  -   " if record["train_loss"] is None else f"{record['train_loss']:.4f}"
        self.log(f"[{trainer.label}] phase {record['phase']} epoch {record['epoch']}/"
                 f"{trainer.total_epochs} step {record['steps']} lr {record['lr']:.4g} "
                 f"loss {loss} acc {acc} admit {record['admitted_frac']:.2f} "
                 f"{record['images_per_s']:.0f} img/s")


class TensorBoardLogger(Callback):
    """Scalars per epoch under ``out_dir/tb`` (import deferred: tensorboard is slow to load).

    A resumed run drops the points past its checkpoint from ``log_dir`` (they are written again),
    every run's that shares the folder included."""

    def __init__(self, log_dir: str):
        self.log_dir = log_dir
        self.writer = None

    def on_train_start(self, trainer):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:  # optional dependency: say so once, keep training
            trainer.log(f"note: tensorboard logging disabled ({exc})")
            return
        # A run killed after an epoch's scalars but before its checkpoint writes that epoch's points
        # again after --resume. purge_step makes TensorBoard drop the killed process's points from
        # the first step the resumed run can write again: the checkpoint's step when it was taken
        # inside an epoch (that epoch's end is still to come, possibly at the same step), the step
        # after it when it was taken at an epoch's end (that epoch's points are kept). TensorBoard
        # purges every tag of the folder: a fresh run must not, in case the folder is shared.
        p = trainer.progress
        purge = p.global_step + (p.batch_in_epoch == 0) if trainer.resumed else None
        self.writer = SummaryWriter(self.log_dir, purge_step=purge)

    def on_epoch_end(self, trainer, record):
        if self.writer is None:
            return
        step = record["steps"]
        for key in ("train_loss", "test_acc", "lr", "admitted_frac", "images_per_s"):
            if record.get(key) is not None:
                self.writer.add_scalar(f"{trainer.label}/{key}", record[key], step)
        self.writer.flush()

    def on_train_end(self, trainer, summary):
        self._close()

    def on_train_stopped(self, trainer, error):
        self._close()  # each epoch was flushed already; this ends the writer's thread and file

    def _close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None
