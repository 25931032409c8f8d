"""Pacing functions, instance sequences and per-epoch order generation."""
import math

import numpy as np
import pytest

from kdseq_fast.curriculum import (PACING_FUNCTIONS, InstanceSequence, OrderGenerator, Pacing,
                                   epoch_batch_sizes, pacing_value)


# ----------------------------------------------------------------------------- pacing
@pytest.mark.parametrize("name", PACING_FUNCTIONS)
@pytest.mark.parametrize("b,a", [(0.2, 0.8), (0.5, 0.5), (0.05, 1.0), (1.0, 0.3)])
def test_pacing_monotone_bounded_and_full_at_a(name, b, a):
    p = np.linspace(0, 1, 1001)
    g = pacing_value(name, p, start_frac=b, full_at=a)
    assert np.all(np.diff(g) >= -1e-12)
    assert np.all((g >= (1.0 if name == "full" else b) - 1e-12) & (g <= 1.0))
    assert np.allclose(g[p >= a], 1.0)
    assert g[0] == pytest.approx(1.0 if name == "full" else b)


def test_pacing_values():
    b, a = 0.2, 0.8
    assert pacing_value("linear", 0.4, start_frac=b, full_at=a) == pytest.approx(0.2 + 0.8 * 0.5)
    assert pacing_value("root", 0.2, start_frac=b, full_at=a) == pytest.approx(0.2 + 0.8 * 0.5)
    expected_exp = 0.2 + 0.8 * math.expm1(5.0) / math.expm1(10.0)
    assert pacing_value("exp", 0.4, start_frac=b, full_at=a) == pytest.approx(expected_exp)
    assert pacing_value("step", 0.79, start_frac=b, full_at=a) == pytest.approx(0.2)
    assert pacing_value("step", 0.8, start_frac=b, full_at=a) == pytest.approx(1.0)
    assert pacing_value("full", 0.0, start_frac=b, full_at=a) == 1.0
    # Root admits data faster than linear, exp slower, in the ramp.
    r, lin, e = (pacing_value(n, 0.3, start_frac=b, full_at=a) for n in ("root", "linear", "exp"))
    assert r > lin > e


@pytest.mark.parametrize("kw,err", [
    ({"start_frac": 0.0}, ValueError), ({"start_frac": 1.5}, ValueError),
    ({"full_at": 0.0}, ValueError), ({"full_at": -1}, ValueError),
    ({"start_frac": "0.2"}, TypeError),
])
def test_pacing_bad_fractions(kw, err):
    with pytest.raises(err, match=next(iter(kw))):
        pacing_value("linear", 0.5, **{"start_frac": 0.2, "full_at": 0.8, **kw})


def test_pacing_unknown_name():
    with pytest.raises(ValueError, match="pacing must be one of"):
        Pacing("cosine")


def test_admitted_counts_ceil_and_minimum():
    p = Pacing("linear", 0.2, 0.8)
    assert p.admitted(0.0, 1000) == 200
    assert p.admitted(0.0, 1001) == 201           # ceil(200.2)
    assert p.admitted(0.0, 10, min_items=4) == 4  # never fewer than one batch
    assert p.admitted(1.0, 1000) == 1000


# ----------------------------------------------------------------------------- sequence
def test_instance_sequence_easy_anti_stable_ties():
    d = np.array([0.5, 0.1, 0.5, 0.9, 0.1])
    assert InstanceSequence(d, "easy").sequence.tolist() == [1, 4, 0, 2, 3]
    assert InstanceSequence(d, "anti").sequence.tolist() == [3, 0, 2, 1, 4]
    ranks = InstanceSequence(d, "easy").ranks()
    assert ranks.tolist() == [2, 0, 3, 4, 1]


def test_instance_sequence_random_is_seeded_permutation():
    d = np.zeros(50)
    a = InstanceSequence(d, "random", seed=3, phase=1).sequence
    b = InstanceSequence(d, "random", seed=3, phase=1).sequence
    c = InstanceSequence(d, "random", seed=3, phase=2).sequence
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert sorted(a.tolist()) == list(range(50))


def test_instance_sequence_accepts_torch_and_rejects_nan():
    torch = pytest.importorskip("torch")
    seq = InstanceSequence(torch.tensor([3.0, 1.0, 2.0]))
    assert seq.sequence.tolist() == [1, 2, 0]
    with pytest.raises(ValueError, match="non-finite"):
        InstanceSequence(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match="order must be one of"):
        InstanceSequence(np.ones(3), "hard")


# ----------------------------------------------------------------------------- orders
def test_epoch_batch_sizes_same_budget():
    assert epoch_batch_sizes(130, 64).tolist() == [64, 64, 2]
    assert epoch_batch_sizes(130, 64, drop_last=True).tolist() == [64, 64]


def test_uniform_epoch_deterministic_permutation():
    g = OrderGenerator(100, 16, seed=7)
    a, b = g.uniform_epoch(0, 3), g.uniform_epoch(0, 3)
    assert np.array_equal(a, b)
    assert sorted(a.tolist()) == list(range(100))
    assert not np.array_equal(a, g.uniform_epoch(0, 4))
    assert not np.array_equal(a, OrderGenerator(100, 16, seed=8).uniform_epoch(0, 3))


@pytest.mark.parametrize("strict", [False, True])
def test_paced_epoch_draws_only_from_admitted_prefix(strict):
    n, bs = 1000, 32
    rng = np.random.default_rng(0)
    seq = rng.permutation(n)
    rank = np.empty(n, dtype=np.int64)
    rank[seq] = np.arange(n)
    g = OrderGenerator(n, bs, seed=1)
    pacing = Pacing("linear", 0.2, 0.8)
    seen_max = []
    for e in range(4):
        order, admitted = g.paced_epoch(seq, pacing, phase=1, epoch_in_phase=e, phase_epochs=4,
                                        strict_order=strict)
        assert order.shape == (n,)
        assert np.all(np.diff(admitted) >= 0)
        starts = np.concatenate([[0], np.cumsum(g.batch_sizes)[:-1]])
        for s, size, k in zip(starts, g.batch_sizes, admitted):
            batch_ranks = rank[order[s:s + size]]
            assert batch_ranks.max() < k
            if not strict:
                assert len(np.unique(order[s:s + size])) == size  # no repeats inside a batch
        seen_max.append(admitted[-1])
    assert admitted[0] < n and seen_max[-1] == n
    # Deterministic from (seed, phase, epoch).
    again, _ = g.paced_epoch(seq, pacing, phase=1, epoch_in_phase=2, phase_epochs=4,
                             strict_order=strict)
    first, _ = OrderGenerator(n, bs, seed=1).paced_epoch(seq, pacing, phase=1, epoch_in_phase=2,
                                                         phase_epochs=4, strict_order=strict)
    assert np.array_equal(again, first)


@pytest.mark.parametrize("mix_frac", [0.0, 0.25])
def test_strict_walk_continues_across_the_epochs_of_a_phase(mix_frac):
    # Strict order walks the admitted prefix as one continuous pass over the phase: a batch, and an
    # epoch, starts right after the last instance the one before took (at the sequence start only
    # when that one closed the prefix), not over at the easiest instance every epoch.
    n, bs = 1000, 32
    seq = np.random.default_rng(3).permutation(n)
    rank = np.empty(n, dtype=np.int64)
    rank[seq] = np.arange(n)
    g = OrderGenerator(n, bs, seed=1)
    pacing = Pacing("linear", 0.2, 0.8)
    starts = np.concatenate([[0], np.cumsum(g.batch_sizes)[:-1]])
    last, carried = None, 0
    for e in range(4):
        order, admitted = g.paced_epoch(seq, pacing, phase=1, epoch_in_phase=e, phase_epochs=4,
                                        strict_order=True, mix_frac=mix_frac)
        for s, size, k in zip(starts, g.batch_sizes, admitted):
            ranks = rank[order[s:s + size]]
            walked = ranks[ranks < k]  # in batch order; the mixed rows come from beyond the prefix
            assert len(walked) < size if mix_frac and k < n else len(walked) == size
            assert np.array_equal(walked[1:], (walked[:-1] + 1) % k)
            if last is not None:
                assert walked[0] == (last + 1 if last + 1 < k else 0), (e, s)
                carried += bool(s == 0 and walked[0] != 0)
            last = int(walked[-1])
    assert carried >= 2  # epochs did carry the walk's position over


def test_paced_epoch_first_batches_are_easiest_prefix():
    n, bs = 500, 50
    seq = np.arange(n)[::-1].copy()  # sequence: 499 easiest ... 0 hardest
    g = OrderGenerator(n, bs, seed=0)
    order, admitted = g.paced_epoch(seq, Pacing("step", 0.2, 0.5), phase=1, epoch_in_phase=0,
                                    phase_epochs=2)
    # Step pacing: the first half of the phase only sees the easiest 20% (indices 400..499).
    assert admitted[0] == 100
    assert set(order[:bs * 2].tolist()) <= set(range(400, 500))
    # Shuffled inside the prefix: not in sequence order, and the two batches cover it.
    assert sorted(order[:100].tolist()) == list(range(400, 500))
    assert order[:100].tolist() != seq[:100].tolist()


def test_strict_order_follows_sequence():
    n, bs = 100, 10
    seq = np.random.default_rng(1).permutation(n)
    g = OrderGenerator(n, bs, seed=0)
    order, admitted = g.paced_epoch(seq, Pacing("full"), phase=1, epoch_in_phase=0,
                                    phase_epochs=1, strict_order=True)
    assert np.array_equal(order, seq)


def test_shuffled_full_pacing_is_a_permutation():
    n = 203
    seq = np.random.default_rng(2).permutation(n)
    g = OrderGenerator(n, 16, seed=5)
    order, _ = g.paced_epoch(seq, Pacing("full"), phase=2, epoch_in_phase=0, phase_epochs=1)
    assert sorted(order.tolist()) == list(range(n))


def _paced(sequence=None, pacing=None, **kw):
    kw = {"phase": 1, "epoch_in_phase": 0, "phase_epochs": 2, **kw}
    seq = np.arange(10) if sequence is None else sequence
    return OrderGenerator(10, 4).paced_epoch(seq, Pacing() if pacing is None else pacing, **kw)


@pytest.mark.parametrize("call,err,match", [
    (lambda: OrderGenerator(0, 4), ValueError, "num_items"),
    (lambda: OrderGenerator(10, 0), ValueError, "batch_size"),
    (lambda: OrderGenerator(10, 4, seed=-1), ValueError, "seed must be a non-negative integer"),
    (lambda: OrderGenerator(10, 4, seed="x"), ValueError, "seed must be a non-negative integer"),
    (lambda: OrderGenerator(10, 4, seed=1.5), ValueError, "seed"),
    (lambda: OrderGenerator(10, 4).uniform_epoch(0, -1), ValueError, "epoch must be a non-negative"),
    (lambda: OrderGenerator(10, 4).uniform_epoch(-1, 0), ValueError, "phase must be a non-negative"),
    (lambda: _paced(np.arange(9), phase_epochs=1), ValueError, "sequence must have shape"),
    (lambda: _paced(epoch_in_phase=2), ValueError, r"epoch_in_phase must be in \[0, 2\)"),
    (lambda: _paced(epoch_in_phase="0"), ValueError, "epoch_in_phase must be a non-negative integer"),
    (lambda: _paced(phase_epochs=0), ValueError, "phase_epochs must be a positive integer"),
    (lambda: _paced(phase=-1), ValueError, "phase must be a non-negative integer"),
    (lambda: _paced(pacing="linear"), TypeError, "pacing must be a Pacing"),
    (lambda: _paced(strict_order="no"), ValueError, "strict_order must be a bool"),
    # sequence must be a permutation of range(num_items): no repeats, in range, integers
    (lambda: _paced([0] * 10), ValueError, r"sequence must be a permutation.*index 0 is duplicated"),
    (lambda: _paced(list(range(5, 15))), ValueError, "sequence.*entry 14 is out of range"),
    (lambda: _paced([-1] + list(range(1, 10))), ValueError, "sequence.*entry -1 is out of range"),
    (lambda: _paced(np.linspace(0, 9.5, 10)), ValueError, "sequence.*hold integers, got dtype float64"),
    (lambda: _paced(np.arange(10) == 0), ValueError, "sequence.*hold integers, got dtype bool"),
    (lambda: epoch_batch_sizes(10, 0), ValueError, "batch_size must be a positive integer"),
    (lambda: epoch_batch_sizes(10, -3), ValueError, "batch_size must be a positive integer"),
    (lambda: epoch_batch_sizes(-10, 3), ValueError, "num_items must be a positive integer"),
    (lambda: epoch_batch_sizes(10.5, 3), ValueError, "num_items must be a positive integer"),
    (lambda: epoch_batch_sizes(10, 3, drop_last="yes"), ValueError, "drop_last must be a bool"),
    (lambda: Pacing().admitted(0.5, 0), ValueError, "num_items must be a positive integer"),
    (lambda: Pacing().admitted(0.5, -5), ValueError, "num_items must be a positive integer"),
    (lambda: Pacing().admitted(0.5, 10.5), ValueError, "num_items must be a positive integer"),
    (lambda: Pacing().admitted(0.5, "10"), ValueError, "num_items must be a positive integer"),
    (lambda: Pacing().admitted(0.5, 10, min_items=1.5), ValueError, "min_items"),
    (lambda: InstanceSequence(np.ones(4), "random", seed=-1), ValueError, "seed must be a non-negative"),
    (lambda: InstanceSequence(np.ones(4), "random", phase=-1), ValueError, "phase must be a non-negative"),
    (lambda: InstanceSequence(np.ones(4), seed="x"), ValueError, "seed must be a non-negative"),
    (lambda: InstanceSequence(["a", "b"]), ValueError, "difficulty must hold real numbers, got dtype <U1"),
    (lambda: InstanceSequence(np.array([1 + 1j, 2])), ValueError, "difficulty must hold real numbers"),
])
def test_order_generator_argument_errors(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_argument_checks_keep_numpy_integers_and_torch_inputs():
    # numpy integers and bools stay accepted where ints / bools are meant (configs, np.load).
    torch = pytest.importorskip("torch")
    g = OrderGenerator(np.int64(10), np.int32(4), seed=np.uint32(3), drop_last=np.bool_(False))
    seq = np.random.default_rng(0).permutation(10).astype(np.int32)
    order, _ = g.paced_epoch(seq, Pacing(), phase=np.int64(1), epoch_in_phase=np.int64(0),
                             phase_epochs=np.int64(2), strict_order=np.bool_(True))
    again, _ = g.paced_epoch(torch.from_numpy(seq), Pacing(), phase=1, epoch_in_phase=0,
                             phase_epochs=2, strict_order=True)
    assert np.array_equal(order, again) and order.dtype == np.int64
    assert epoch_batch_sizes(np.int64(10), np.int64(4)).tolist() == [4, 4, 2]
    assert Pacing().admitted(0.0, np.int64(10)) == 2
    assert InstanceSequence(np.array([2, 0, 1])).sequence.tolist() == [1, 2, 0]
    # A tensor without data is refused by name, not by torch's "Cannot copy out of meta tensor".
    with pytest.raises(ValueError, match="difficulty is a tensor on the meta device"):
        InstanceSequence(torch.zeros(4, device="meta"))
    with pytest.raises(ValueError, match="sequence is a tensor on the meta device"):
        g.paced_epoch(torch.zeros(10, dtype=torch.long, device="meta"), Pacing(), phase=1,
                      epoch_in_phase=0, phase_epochs=2)


@pytest.mark.parametrize("strict", [False, True])
def test_easy_first_mixing_share_comes_from_the_rest(strict):
    n, bs, mix = 1000, 32, 0.25
    seq = np.random.default_rng(3).permutation(n)
    rank = np.empty(n, dtype=np.int64)
    rank[seq] = np.arange(n)
    g = OrderGenerator(n, bs, seed=4)
    pacing = Pacing("linear", 0.2, 0.8)
    order, admitted = g.paced_epoch(seq, pacing, phase=1, epoch_in_phase=0, phase_epochs=2,
                                    strict_order=strict, mix_frac=mix)
    assert order.shape == (n,)
    starts = np.concatenate([[0], np.cumsum(g.batch_sizes)[:-1]])
    mixed = 0
    for s, size, k in zip(starts, g.batch_sizes, admitted):
        r = rank[order[s:s + size]]
        expect = 0 if k >= n else min(round(mix * size), n - k, size - 1)
        assert (r >= k).sum() == expect          # exactly the mixed share from the rest
        assert len(np.unique(r[r >= k])) == expect  # without replacement inside the batch
        mixed += expect
    assert mixed > 0
    # Each rank of a distributed run takes a contiguous part of every batch (and normalizes it with
    # its own BatchNorm statistics): the drawn rows are spread, not all on the last rank.
    for s, size, k in zip(starts, g.batch_sizes, admitted):
        parts = np.array_split(rank[order[s:s + size]], 4)
        per_rank = [int((part >= k).sum()) for part in parts]
        assert max(per_rank) - min(per_rank) <= 1, per_rank
    if strict:  # the admitted rows keep their walk of the sequence, in order
        r = rank[order[:bs]]
        assert np.all(np.diff(r[r < admitted[0]]) == 1)
    # Deterministic, and mix_frac=0 reproduces the unmixed orders exactly.
    again, _ = OrderGenerator(n, bs, seed=4).paced_epoch(seq, pacing, phase=1, epoch_in_phase=0,
                                                         phase_epochs=2, strict_order=strict,
                                                         mix_frac=mix)
    assert np.array_equal(order, again)
    plain, _ = g.paced_epoch(seq, pacing, phase=1, epoch_in_phase=0, phase_epochs=2,
                             strict_order=strict)
    zero, _ = g.paced_epoch(seq, pacing, phase=1, epoch_in_phase=0, phase_epochs=2,
                            strict_order=strict, mix_frac=0.0)
    assert np.array_equal(plain, zero)
    with pytest.raises(ValueError, match="mix_frac"):
        g.paced_epoch(seq, pacing, phase=1, epoch_in_phase=0, phase_epochs=2, mix_frac=1.0)


def test_ordered_full_coverage_walks_the_sequence_every_epoch():
    # The "ordered full coverage" reading: pacing full + strict order shows all N instances once
    # per epoch, easy -> hard, in every epoch of the phase.
    n, bs = 90, 16
    seq = np.random.default_rng(5).permutation(n)
    g = OrderGenerator(n, bs, seed=0)
    for e in range(3):
        order, admitted = g.paced_epoch(seq, Pacing("full"), phase=1, epoch_in_phase=e,
                                        phase_epochs=3, strict_order=True)
        assert np.array_equal(order, seq) and (admitted == n).all()


def test_admitted_counts_exact_values():
    # The prefix is ceil(g * N), at least one batch, and g * N that is an integer up to float
    # error does not jump by one.
    assert Pacing("linear", 0.07, 0.8).admitted(0.0, 100) == 7
    assert OrderGenerator(100, 32).admitted_counts(Pacing("linear", 0.1, 0.8), 0, 1)[0] == 32
    g = OrderGenerator(1000, 32)
    counts = g.admitted_counts(Pacing("linear", 0.2, 0.8), 0, 4)
    assert counts[0] == 200 and np.all(np.diff(counts) >= 0) and len(counts) == len(g.batch_sizes)
    assert g.admitted_counts(Pacing("linear", 0.2, 0.8), 3, 4)[-1] == 1000


def test_shuffled_paced_epoch_visits_each_admitted_instance_before_repeating():
    # "A pool of not-yet-used admitted positions": until the first repeat, no admitted instance
    # (newly admitted ones included) is left out.
    n, bs = 1000, 32
    seq = np.random.default_rng(0).permutation(n)
    rank = np.empty(n, dtype=np.int64)
    rank[seq] = np.arange(n)
    g = OrderGenerator(n, bs, seed=1)
    order, admitted = g.paced_epoch(seq, Pacing("linear", 0.2, 0.8), phase=1, epoch_in_phase=0, phase_epochs=4)
    starts = np.concatenate([[0], np.cumsum(g.batch_sizes)])
    seen = set()
    for j in range(len(g.batch_sizes)):
        batch = rank[order[starts[j]:starts[j + 1]]].tolist()
        if seen & set(batch):  # the pool ran out in this batch: everything admitted was drawn
            assert set(range(int(admitted[j]))) <= seen | set(batch)
            break
        seen |= set(batch)
    else:
        pytest.fail("no batch repeated an instance")


def _flat_pool_paced_epoch(gen, seq, pacing, phase, epoch_in_phase, phase_epochs, mix_frac):
    """The shuffled mode as first written, with the pool a flat array and np.delete (O(N) a
    batch): the reference the faster pool must match draw for draw."""
    from kdseq_fast.curriculum import _TAG_PACED, _rng, _spread_tail

    admitted = gen.admitted_counts(pacing, epoch_in_phase, phase_epochs)
    positions = np.empty(int(gen.batch_sizes.sum()), dtype=np.int64)
    out = 0
    rng = _rng(gen.seed, _TAG_PACED, phase, epoch_in_phase)
    current = int(admitted[0])
    pool = rng.permutation(current)
    for n, b in zip(admitted, gen.batch_sizes):
        n = int(n)
        k = gen._mixed_rows(mix_frac, n, int(b))
        if k:
            positions[out + b - k:out + b] = n + rng.choice(gen.num_items - n, size=k, replace=False)
            b = b - k
        if n > current:
            pool = np.concatenate([pool, np.arange(current, n)])
            current = n
        if pool.size < b:
            first = pool
            used = np.zeros(current, dtype=bool)
            used[first] = True
            pool = rng.permutation(np.flatnonzero(~used))
            need = b - first.size
            chosen = np.concatenate([first, pool[:need]])
            pool = np.concatenate([pool[need:], first])
        else:
            pick = rng.choice(pool.size, size=b, replace=False)
            chosen = pool[pick]
            pool = np.delete(pool, pick)
        positions[out:out + b] = chosen
        if k:
            _spread_tail(positions[out:out + b + k], k)
        out += b + k
    return seq[positions], admitted


@pytest.mark.parametrize("num_items,batch,pacing,phase_epochs,mix_frac", [
    (1000, 64, Pacing("linear", 0.2, 0.8), 3, 0.0),
    (1000, 64, Pacing("linear", 0.2, 0.8), 3, 0.2),
    (777, 50, Pacing("root", 0.1, 0.5), 4, 0.3),
    (300, 7, Pacing("step", 0.3, 0.6), 2, 0.0),     # odd sizes: refills mid-batch, short last batch
    (130, 128, Pacing("linear", 0.5, 1.0), 3, 0.0),  # a batch near the whole set: a refill per step
    (20000, 256, Pacing("linear", 0.2, 0.8), 2, 0.2),  # blocks of the pool fill and empty
])
def test_shuffled_paced_orders_match_the_flat_pool_draw_for_draw(num_items, batch, pacing, phase_epochs,
                                                                 mix_frac):
    # The pool moved from np.delete on a flat array (O(N^2/B) an epoch) to blocks with live
    # counts; runs, resumes and recorded results depend on the orders staying the same.
    gen = OrderGenerator(num_items, batch, seed=3)
    seq = np.random.default_rng(1).permutation(num_items)
    for epoch in range(phase_epochs):
        got, got_adm = gen.paced_epoch(seq, pacing, phase=1, epoch_in_phase=epoch, phase_epochs=phase_epochs,
                                       mix_frac=mix_frac)
        want, want_adm = _flat_pool_paced_epoch(gen, seq, pacing, 1, epoch, phase_epochs, mix_frac)
        np.testing.assert_array_equal(got_adm, want_adm)
        np.testing.assert_array_equal(got, want)
