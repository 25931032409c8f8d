"""EpochSums: the epoch's running sums, its metrics record and what checkpoints keep of it.

The real multi-process paths (gloo, resume under another world size) run in test_distributed.py;
here a stand-in context adds the other ranks' contributions so each rule is checked exactly.
"""
from types import SimpleNamespace

import pytest
import torch

from kdseq_fast.epoch_sums import COUNTS, EpochSums
from kdseq_fast.runtime import RunContext


class FakeRanks(RunContext):
    """Rank `rank` of `world`; reduce_sum adds `others` (the other ranks' contributions)."""

    def __init__(self, rank, world, others=None):
        super().__init__(device=torch.device("cpu"), rank=rank, world_size=world)
        self.others = others

    def reduce_sum(self, values):
        if self.others is None:
            return list(values)
        assert len(self.others) == len(values)
        return [v + o for v, o in zip(values, self.others)]


def _read(loss_sum, samples, correct):
    return SimpleNamespace(loss_sum=loss_sum, samples=samples, correct=correct)


def _sums(loss_sum, samples, correct):
    s = EpochSums()
    s.add_read(_read(loss_sum, samples, correct))
    return s


def test_record_sums_ranks_and_reports_disjoint_times():
    s = _sums(6.0, 12, 9)
    s.add_step(0.5)
    s.add_step(1.0)
    s.add_times({"data": 1.0, "model": 5.0, "loss": 2.0})
    s.add_time("train_time", 10.0)
    s.add_time("compile", 4.0)
    rec = s.record(FakeRanks(0, 2, others=[2.0, 4, 3]))  # rank 1: loss 2.0 over 4 samples, 3 right
    assert rec["train_loss"] == pytest.approx(8.0 / 16)
    assert rec["train_acc"] == pytest.approx(12 / 16)
    assert rec["admitted_frac"] == pytest.approx(0.75)
    assert rec["images_per_s"] == pytest.approx(16 / 6.0)  # compilation is not training time
    assert (rec["time_model"], rec["time_loss"], rec["time_data"]) == (3.0, 2.0, 1.0)


def test_empty_epoch_record_has_no_division_by_zero():
    # An epoch without an accepted step (every one rejected, train.nonfinite=skip) has no training
    # loss or accuracy, rather than a loss of 0.
    rec = EpochSums().record(FakeRanks(0, 1))
    assert rec["train_loss"] is None and rec["train_acc"] is None and rec["admitted_frac"] == 0.0
    assert rec["loss_scale_skips"] == 0
    assert EpochSums().mean_loss() is None


def test_unknown_time_segment_is_named():
    with pytest.raises(KeyError, match="'eval'"):
        EpochSums().add_time("eval", 1.0)


def test_reset_starts_from_zero():
    s = _sums(1.0, 2, 1)
    s.add_time("scoring", 3.0)
    s.reset()
    assert s.mean_loss() is None and s["scoring"] == 0.0 and s["steps"] == 0


def test_single_process_checkpoint_round_trip():
    s = _sums(1.5, 3, 2)
    s.add_step(0.25)
    s.add_time("data", 0.5)
    state = s.state_dict(FakeRanks(0, 1))
    assert "rank_sums" not in state
    t = EpochSums()
    t.load_state_dict(state, FakeRanks(0, 1))
    assert t.values == s.values


def _two_rank_state():
    """The checkpoint rank 0 writes when rank 0 summed (1.0, 2, 1) and rank 1 (3.0, 4, 4)."""
    # Each rank fills its own slots; the other rank's slots arrive through reduce_sum.
    state = _sums(1.0, 2, 1).state_dict(FakeRanks(0, 2, others=[0.0, 0, 0, 3.0, 4, 4]))
    state1 = _sums(3.0, 4, 4).state_dict(FakeRanks(1, 2, others=[1.0, 2, 1, 0.0, 0, 0]))
    assert state["rank_sums"] == state1["rank_sums"] == [[1.0, 2, 1], [3.0, 4, 4]]
    return state


def test_distributed_checkpoint_keeps_each_rank_and_the_totals():
    state = _two_rank_state()
    assert (state["loss_sum"], state["samples"], state["correct"]) == (4.0, 6, 5)
    for rank, expect in ((0, (1.0, 2, 1)), (1, (3.0, 4, 4))):
        s = EpochSums()
        s.load_state_dict(state, FakeRanks(rank, 2))
        assert tuple(s[k] for k in COUNTS) == expect
        assert "rank_sums" not in s.values


def test_resume_under_another_world_size_gives_rank0_the_totals():
    state = _two_rank_state()
    main, other = EpochSums(), EpochSums()
    main.load_state_dict(state, FakeRanks(0, 3))
    other.load_state_dict(state, FakeRanks(2, 3))
    assert tuple(main[k] for k in COUNTS) == (4.0, 6, 5)
    assert tuple(other[k] for k in COUNTS) == (0.0, 0, 0)  # not counted twice
    single = EpochSums()
    single.load_state_dict(state, FakeRanks(0, 1))
    assert tuple(single[k] for k in COUNTS) == (4.0, 6, 5)
