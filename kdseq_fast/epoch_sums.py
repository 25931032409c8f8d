"""The running sums of the epoch in progress: what the trainer adds up between two epoch ends.

Training counts (loss, samples, correct predictions) arrive from the device step's folds; the
admitted fraction arrives once a step; wall-time segments arrive from the segment timer, scoring
and the teacher-logit pass. At the epoch's end the sums become one record of ``metrics.jsonl``
(:meth:`EpochSums.record`) and start again from zero.

Under ``torch.distributed`` each rank holds its own training counts. A checkpoint keeps every
rank's counts (an exact resume with the same world size) and their totals (what rank 0 resumes
with under another world size; the other ranks then start from zero, so the totals are not
counted twice). Of the timings and step counts, which each rank also keeps, checkpoints hold rank
0's.
"""
from __future__ import annotations

import math

from .runtime import RunContext

__all__ = ["EpochSums"]

# Summed over ranks at the epoch's end and kept per rank in checkpoints.
COUNTS = ("loss_sum", "samples", "correct")
# Seconds per segment of the epoch: timer segments (data, model, loss) and the trainer's own.
TIMES = ("data", "model", "loss", "scoring", "teacher_cache", "train_time", "compile")


class EpochSums:
    """Sums of one epoch; see the module docstring. ``values`` is the checkpointed dict."""

    def __init__(self) -> None:
        self.values: dict = {}
        self.reset()

    def reset(self) -> None:
        self.values = {"loss_sum": 0.0, "samples": 0, "correct": 0, "steps": 0, "admitted_sum": 0.0,
                       "scale_skips": 0, **{k: 0.0 for k in TIMES}}

    def __getitem__(self, key: str):
        return self.values[key]

    # ------------------------------------------------------------------ adding
    def add_read(self, read) -> None:
        """A device-step fold (``loss_sum``, ``samples``, ``correct`` of the accepted steps)."""
        v = self.values
        v["loss_sum"] += read.loss_sum
        v["samples"] += read.samples
        v["correct"] += read.correct
        # fp16 overflow skips: the ranks agree on them (one all-reduced flag), so not summed.
        v["scale_skips"] += getattr(read, "scale_skips", 0)

    def add_step(self, admitted_frac: float) -> None:
        self.values["steps"] += 1
        self.values["admitted_sum"] += admitted_frac

    def add_time(self, segment: str, seconds: float) -> None:
        if segment not in TIMES:
            raise KeyError(f"unknown time segment {segment!r}; expected one of {', '.join(TIMES)}")
        self.values[segment] += seconds

    def add_times(self, segments: dict) -> None:
        """The segment timer's totals (``data``, ``model``, ``loss``)."""
        for k, s in segments.items():
            self.add_time(k, s)

    def mean_loss(self) -> float | None:
        """This rank's mean training loss so far (None before the first read)."""
        v = self.values
        return v["loss_sum"] / v["samples"] if v["samples"] else None

    # ------------------------------------------------------------------ the epoch's record
    def record(self, ctx: RunContext) -> dict:
        """The epoch's metric fields; every rank must call it (the counts are summed over ranks)."""
        v = self.values
        loss_sum, samples, correct = ctx.reduce_sum([v[k] for k in COUNTS])
        return {
            # None, not 0, for an epoch whose every step was rejected (train.nonfinite=skip).
            "train_loss": loss_sum / samples if samples else None,
            "train_acc": correct / samples if samples else None,
            "admitted_frac": v["admitted_sum"] / max(v["steps"], 1),
            "loss_scale_skips": v["scale_skips"],
            # Compilation is reported apart, not counted against the throughput.
            "images_per_s": samples / max(v["train_time"] - v["compile"], 1e-9),
            # The model segment encloses the loss call; report them disjoint.
            "time_data": v["data"], "time_model": v["model"] - v["loss"], "time_loss": v["loss"],
            "time_scoring": v["scoring"], "time_teacher_cache": v["teacher_cache"],
            "time_train": v["train_time"], "time_compile": v["compile"],
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, ctx: RunContext) -> dict:
        """What a checkpoint keeps (meaningful on rank 0). Every rank must call it: the ranks'
        counts are gathered."""
        state = dict(self.values)
        if not ctx.distributed:
            return state
        w, r, n = ctx.world_size, ctx.rank, len(COUNTS)
        slots = [0.0] * (n * w)
        for i, k in enumerate(COUNTS):
            slots[n * r + i] = float(self.values[k])
        slots = ctx.reduce_sum(slots)  # a sum of one-hot slots: an all-gather
        per_rank = [slots[n * q:n * (q + 1)] for q in range(w)]
        state["rank_sums"] = per_rank
        state["loss_sum"] = math.fsum(p[0] for p in per_rank)
        state["samples"] = int(sum(p[1] for p in per_rank))
        state["correct"] = int(sum(p[2] for p in per_rank))
        return state

    def load_state_dict(self, state: dict, ctx: RunContext) -> None:
        state = dict(state)
        per_rank = state.pop("rank_sums", None)
        self.reset()
        self.values.update(state)
        if per_rank is not None and len(per_rank) == ctx.world_size:
            loss_sum, samples, correct = per_rank[ctx.rank]
            self.values.update(loss_sum=loss_sum, samples=int(samples), correct=int(correct))
        elif not ctx.is_main:
            self.values.update(loss_sum=0.0, samples=0, correct=0)  # rank 0 holds the totals
