"""RunProgress: where a run stands, and the checkpoint entries (format 2) it reads and writes."""
import numpy as np
import torch

from kdseq_fast.progress import RunProgress


def test_record_eval_keeps_history_and_best():
    p = RunProgress()
    p.global_step = 10
    assert p.record_eval(0.0)  # the first evaluation is the best so far, even at 0
    p.global_step = 20
    assert p.record_eval(0.5)
    p.global_step = 30
    assert not p.record_eval(0.4)
    assert not p.record_eval(0.5)  # a tie keeps the earlier best
    assert p.history == [(10, 0.0), (20, 0.5), (30, 0.4), (30, 0.5)] and p.best_acc == 0.5


def test_next_batch_advances_the_step_and_the_position():
    p = RunProgress(epoch=2, batch_in_epoch=3, global_step=40)
    p.next_batch()
    assert (p.epoch, p.batch_in_epoch, p.global_step) == (2, 4, 41)


def test_checkpoint_entries_round_trip():
    p = RunProgress(epoch=3, batch_in_epoch=5, global_step=77, scored_phase=1,
                    sequence=np.array([2, 0, 1], dtype=np.int64),
                    history=[(10, 0.25), (20, 0.5)], best_acc=0.5, best_state={"w": torch.ones(2)},
                    teacher_acc=0.9, wall_before=3.0, metrics_lines=2, skipped_batches=1)
    state = p.state_dict(wall_s=12.5)
    # The keys of checkpoint format 2: older checkpoints must keep resuming.
    assert set(state) == {"progress", "curriculum", "history", "best_acc", "best_state", "teacher_acc"}
    assert state["progress"] == {"epoch": 3, "batch": 5, "global_step": 77, "scored_phase": 1,
                                 "metrics_lines": 2, "wall_s": 12.5, "skipped_batches": 1}
    q = RunProgress.from_state(state)
    assert q.wall_before == 12.5  # the resumed process adds its own time to the stored total
    for name in ("epoch", "batch_in_epoch", "global_step", "scored_phase", "history", "best_acc",
                 "teacher_acc", "metrics_lines", "skipped_batches"):
        assert getattr(q, name) == getattr(p, name), name
    assert q.sequence.dtype == np.int64 and np.array_equal(q.sequence, p.sequence)
    assert torch.equal(q.best_state["w"], p.best_state["w"])
    # The snapshot scores are in phase_K_scores.npy, not in every checkpoint (29 of 50 MiB at 1.28M
    # items); the sequence is stored as int32.
    assert state["curriculum"]["scores"] is None and state["curriculum"]["sequence"].dtype == torch.int32
    # A checkpoint written before (int64 sequence, scores held) still loads.
    old = dict(state, curriculum={"sequence": torch.tensor([2, 0, 1]), "scores": torch.zeros(3, 6)})
    assert np.array_equal(RunProgress.from_state(old).sequence, p.sequence)


def test_a_run_before_its_first_phase_has_no_curriculum():
    q = RunProgress.from_state(RunProgress().state_dict(wall_s=0.0))
    assert q.sequence is None and q.scored_phase == -1 and q.history == []
