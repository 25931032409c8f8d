"""Where the device step's non-finite guard rejected updates, told in words.

The guard (:mod:`.step`) skips a NaN/inf update on the device and counts it; the host learns of it
only at the next device read (every ``train.log_every_steps`` steps on a GPU). Until then the
trainer records which batch each step trained on, so a rejection can be reported with its step,
phase, epoch and the batch's dataset indices.
"""
from __future__ import annotations

import torch

__all__ = ["RejectedSteps"]


class RejectedSteps:
    """The steps since the last device read and the reads that reported rejected steps."""

    def __init__(self):
        self._recent: list[tuple[int, int, int, int, torch.Tensor]] = []
        self._reports: list = []

    def record(self, step: int, phase: int, epoch: int, batch: int, indices: torch.Tensor) -> None:
        """Step ``step`` (1-based global step) trained on ``indices`` (kept on their device)."""
        self._recent.append((step, phase, epoch, batch, indices))

    def add_read(self, read) -> None:
        """A device read (:class:`~kdseq_fast.step.FoldResult`-like: ``bad_steps``, ``first_bad``)."""
        if read.bad_steps:
            self._reports.append(read)

    def take(self) -> tuple[int, str] | None:
        """(rejected steps, what to tell the user) since the last call, or None; forgets the
        recorded steps either way."""
        recent, self._recent = self._recent, []
        if not self._reports:
            return None
        bad = sum(r.bad_steps for r in self._reports)
        first = next(r.first_bad for r in self._reports if r.first_bad >= 0)
        self._reports = []
        where = next((rec for rec in recent if rec[0] == first), None)
        if where is not None:
            step, phase, epoch, batch, indices = where
            idx = indices.cpu().tolist()
            shown = ", ".join(map(str, idx[:16])) + (f", ... ({len(idx)} in all)" if len(idx) > 16 else "")
            at = f"step {step}, phase {phase}, epoch {epoch + 1}, batch {batch} with dataset indices [{shown}]"
        else:
            at = f"step {first}"
        more = f" ({bad} rejected steps since the previous check)" if bad > 1 else ""
        return bad, f"non-finite loss or gradient at {at}{more}; the update was not applied"
