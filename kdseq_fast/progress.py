"""Where a run stands: the position in the epoch plan, the current phase's curriculum, the
evaluation history and the best model so far.

Together with the model, optimizer, schedule, device-step and RNG states (the trainer's) and the
epoch's running sums (:mod:`.epoch_sums`), this is what a checkpoint holds; the checkpoint keys are
those of format 2 (``progress``, ``curriculum``, ``history``, ``best_acc``, ``best_state``,
``teacher_acc``), so older checkpoints resume unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["RunProgress"]


@dataclass
class RunProgress:
    epoch: int = 0              # index of the epoch in progress / next to run
    batch_in_epoch: int = 0     # next batch of that epoch
    global_step: int = 0
    scored_phase: int = -1      # phase whose sequence/scores are held
    sequence: np.ndarray | None = None   # that phase's instance sequence (easy to hard, or as ordered)
    history: list = field(default_factory=list)  # (steps, test_acc) at each evaluation
    best_acc: float = 0.0
    best_state: dict | None = None       # teacher runs: the best weights (host copies)
    teacher_acc: float | None = None
    wall_before: float = 0.0    # training wall time spent by earlier processes of this run
    metrics_lines: int = 0      # records in metrics.jsonl that belong to this state
    skipped_batches: int = 0    # steps the non-finite guard rejected (train.nonfinite=skip)

    def next_batch(self) -> None:
        self.batch_in_epoch += 1
        self.global_step += 1

    def record_eval(self, acc: float) -> bool:
        """Adds an evaluation to the history; True when it is the best so far (or the first)."""
        self.history.append((self.global_step, acc))
        if acc > self.best_acc or len(self.history) == 1:
            self.best_acc = acc
            return True
        return False

    def state_dict(self, wall_s: float) -> dict:
        """The checkpoint entries; ``wall_s`` is the run's training wall time up to now."""
        return {
            "progress": {"epoch": self.epoch, "batch": self.batch_in_epoch,
                         "global_step": self.global_step, "scored_phase": self.scored_phase,
                         "metrics_lines": self.metrics_lines, "wall_s": wall_s,
                         "skipped_batches": self.skipped_batches},
            # The scores stay out (phase_K_scores.npy has them; nothing reads them back): at
            # N = 1.28M they were 29 of a checkpoint's 50 MiB. The key stays for older readers, and
            # the sequence is int32 where it fits (readers widen it).
            "curriculum": {"sequence": None if self.sequence is None else torch.from_numpy(
                self.sequence.astype(np.int32 if self.sequence.size < 2**31 else np.int64)),
                "scores": None},
            "history": [list(h) for h in self.history],
            "best_acc": self.best_acc, "best_state": self.best_state,
            "teacher_acc": self.teacher_acc,
        }

    @classmethod
    def from_state(cls, state: dict) -> "RunProgress":
        p = state["progress"]
        seq = state["curriculum"]["sequence"]
        return cls(epoch=p["epoch"], batch_in_epoch=p["batch"], global_step=p["global_step"],
                   scored_phase=p["scored_phase"],
                   sequence=None if seq is None else seq.numpy().astype(np.int64),
                   history=[(int(s), float(a)) for s, a in state["history"]],
                   best_acc=state["best_acc"], best_state=state["best_state"],
                   teacher_acc=state["teacher_acc"], wall_before=p["wall_s"],
                   metrics_lines=p["metrics_lines"], skipped_batches=p["skipped_batches"])
