"""Curriculum pieces of ISL-KD: pacing functions, the instance sequence and per-epoch orders.

Nothing here touches a model or a tensor device: the trainer turns per-instance difficulties
into an :class:`InstanceSequence` (easy -> hard) and asks an :class:`OrderGenerator` for the
index order of every epoch, which it hands to ``CurriculumLoader.set_order``.

Pacing follows Wu, Dyer & Neyshabur, "When do curricula work?" (ICLR 2021): ``g(t)`` is the
fraction of the sequence admitted at step ``t`` of a phase of ``T`` steps. With start fraction
``b`` and full-data point ``a`` (both in (0, 1]) and ``x = min(1, t / (a*T))``:

=========  ============================================
linear     ``b + (1 - b) * x``
root       ``b + (1 - b) * sqrt(x)``
exp        ``b + (1 - b) * (exp(10 x) - 1) / (exp(10) - 1)``
step       ``b`` while ``x < 1``, then ``1`` (one jump at ``a*T``)
full       ``1`` (no curriculum; the ablation baseline)
=========  ============================================

Every order is a pure function of ``(seed, phase, epoch)`` and the sequence, so an interrupted
run regenerates exactly the order it was following.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .arguments import check_bool, check_int, host_array

__all__ = [
    "PACING_FUNCTIONS", "ORDER_KINDS", "pacing_value", "Pacing", "InstanceSequence",
    "OrderGenerator", "epoch_batch_sizes",
]

PACING_FUNCTIONS = ("linear", "root", "step", "exp", "full")
ORDER_KINDS = ("easy", "anti", "random")

# Stream tags keep the random streams of different uses independent even for equal (seed, phase,
# epoch) triples.
_TAG_UNIFORM = 1
_TAG_PACED = 2
_TAG_RANDOM_SEQUENCE = 3
_TAG_MIX = 4


def _rng(seed: int, *stream: int) -> np.random.Generator:
    # SeedSequence mixes the tuple into a well-spread state; PCG64 output is platform independent.
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), *map(int, stream)])))


def _check_frac(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a number in (0, 1], got {type(value).__name__} {value!r}")
    value = float(value)
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must be in (0, 1], got {value}")
    return value


def pacing_value(name: str, progress, *, start_frac: float = 0.2, full_at: float = 0.8):
    """Admitted fraction ``g`` at ``progress`` = t / T in [0, 1] (scalar or array).

    Values lie in ``[start_frac, 1]``, are non-decreasing in ``progress`` and reach 1 at
    ``progress >= full_at``.
    """
    if name not in PACING_FUNCTIONS:
        raise ValueError(f"pacing must be one of {', '.join(PACING_FUNCTIONS)}; got {name!r}")
    b = _check_frac("start_frac", start_frac)
    a = _check_frac("full_at", full_at)
    p = np.asarray(progress, dtype=np.float64)
    if np.any(~np.isfinite(p)) or np.any(p < 0):
        raise ValueError("progress must be finite and >= 0")
    x = np.minimum(1.0, p / a)
    if name == "linear":
        g = b + (1.0 - b) * x
    elif name == "root":
        g = b + (1.0 - b) * np.sqrt(x)
    elif name == "exp":
        g = b + (1.0 - b) * np.expm1(10.0 * x) / math.expm1(10.0)
    elif name == "step":
        g = np.where(x < 1.0, b, 1.0)
    else:  # full
        g = np.ones_like(x)
    g = np.clip(g, b if name != "full" else 1.0, 1.0)
    return float(g) if np.ndim(progress) == 0 else g


@dataclass(frozen=True)
class Pacing:
    """A pacing function bound to its parameters; ``pacing(progress)`` -> admitted fraction."""

    name: str = "linear"
    start_frac: float = 0.2
    full_at: float = 0.8

    def __post_init__(self):
        # Validate eagerly so a bad config fails before any training happens.
        pacing_value(self.name, 0.0, start_frac=self.start_frac, full_at=self.full_at)

    def __call__(self, progress):
        return pacing_value(self.name, progress, start_frac=self.start_frac, full_at=self.full_at)

    def admitted(self, progress, num_items: int, min_items: int = 1):
        """Number of admitted instances ``ceil(g * N)``, at least ``min(min_items, N)``."""
        num_items = check_int("num_items", num_items, 1)
        min_items = check_int("min_items", min_items, 0)
        g = np.asarray(self(progress), dtype=np.float64)
        # Round before ceil so g*N that is an integer up to float error does not jump by one.
        n = np.ceil(np.round(g * num_items, 9)).astype(np.int64)
        n = np.clip(n, min(max(1, min_items), num_items), num_items)
        return int(n) if np.ndim(progress) == 0 else n


class InstanceSequence:
    """Dataset indices ordered easy -> hard by a difficulty vector (larger = harder).

    ``order="easy"``: ascending difficulty, ties broken by ascending index (stable sort);
    ``"anti"``: descending difficulty, ties still by ascending index; ``"random"``: a seeded
    permutation that ignores the difficulties (the ablation that keeps the pacing but not the
    order).
    """

    def __init__(self, difficulty, order: str = "easy", *, seed: int = 0, phase: int = 0):
        if order not in ORDER_KINDS:
            raise ValueError(f"order must be one of {', '.join(ORDER_KINDS)}; got {order!r}")
        seed = check_int("seed", seed, 0)
        phase = check_int("phase", phase, 0)
        d = np.asarray(host_array(difficulty, "difficulty"))
        try:  # bool/int/float, or an object array of real numbers; not strings, complex, dates
            if d.dtype.kind not in "biufO":
                raise TypeError
            d = d.astype(np.float64, copy=False)
        except (TypeError, ValueError):
            raise ValueError(f"difficulty must hold real numbers, got dtype {d.dtype}") from None
        if d.ndim != 1 or d.size == 0:
            raise ValueError(f"difficulty must be a non-empty 1-D array, got shape {d.shape}")
        bad = ~np.isfinite(d)
        if bad.any():
            raise ValueError(f"difficulty has {int(bad.sum())} non-finite values (first at index "
                             f"{int(np.flatnonzero(bad)[0])}); the snapshot that scored them has "
                             "probably diverged")
        self.difficulty = d
        self.order = order
        if order == "easy":
            seq = np.argsort(d, kind="stable")
        elif order == "anti":
            seq = np.argsort(-d, kind="stable")
        else:
            seq = _rng(seed, _TAG_RANDOM_SEQUENCE, phase).permutation(d.size)
        self.sequence = seq.astype(np.int64)

    def __len__(self) -> int:
        return int(self.sequence.size)

    def ranks(self) -> np.ndarray:
        """``ranks()[i]`` = position of dataset index ``i`` in the sequence (0 = easiest)."""
        r = np.empty_like(self.sequence)
        r[self.sequence] = np.arange(self.sequence.size)
        return r


def epoch_batch_sizes(num_items: int, batch_size: int, drop_last: bool = False) -> np.ndarray:
    """Batch sizes of one pass over ``num_items`` (the step budget every method shares)."""
    num_items = check_int("num_items", num_items, 1)
    batch_size = check_int("batch_size", batch_size, 1)
    drop_last = check_bool("drop_last", drop_last)
    full, rest = divmod(num_items, batch_size)
    sizes = [batch_size] * full
    if rest and not drop_last:
        sizes.append(rest)
    if not sizes:
        raise ValueError(f"batch_size={batch_size} with drop_last leaves no batch for "
                         f"{num_items} items")
    return np.asarray(sizes, dtype=np.int64)


class OrderGenerator:
    """Index orders for each epoch: uniform shuffles, or paced draws from an instance sequence.

    Every epoch has the same batch sizes as a plain pass over the data, so ``ce``, ``kd`` and
    ``isl`` spend the same number of optimizer steps per epoch and step counts compare directly.
    """

    def __init__(self, num_items: int, batch_size: int, *, seed: int = 0, drop_last: bool = False):
        self.num_items = check_int("num_items", num_items, 1)
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.seed = check_int("seed", seed, 0)
        self.batch_sizes = epoch_batch_sizes(self.num_items, self.batch_size, drop_last)

    @property
    def steps_per_epoch(self) -> int:
        return int(self.batch_sizes.size)

    def uniform_epoch(self, phase: int, epoch: int) -> np.ndarray:
        """A uniformly shuffled permutation of all indices (warm-up, kd, ce, final epochs)."""
        phase, epoch = check_int("phase", phase, 0), check_int("epoch", epoch, 0)
        return _rng(self.seed, _TAG_UNIFORM, phase, epoch).permutation(self.num_items).astype(np.int64)

    def admitted_counts(self, pacing: Pacing, epoch_in_phase: int, phase_epochs: int) -> np.ndarray:
        """Admitted prefix length before each batch of ``epoch_in_phase`` (0-based)."""
        if not isinstance(pacing, Pacing):
            raise TypeError(f"pacing must be a Pacing (e.g. Pacing('linear', 0.2, 0.8)), got "
                            f"{type(pacing).__name__} {pacing!r}")
        phase_epochs = check_int("phase_epochs", phase_epochs, 1)
        epoch_in_phase = check_int("epoch_in_phase", epoch_in_phase, 0)
        if not (0 <= epoch_in_phase < phase_epochs):
            raise ValueError(f"epoch_in_phase must be in [0, {phase_epochs}), got {epoch_in_phase}")
        s = self.steps_per_epoch
        total = s * phase_epochs
        t = epoch_in_phase * s + np.arange(s)
        return pacing.admitted(t / total, self.num_items, min_items=self.batch_size)

    def paced_epoch(self, sequence, pacing: Pacing, *, phase: int, epoch_in_phase: int,
                    phase_epochs: int, strict_order: bool = False, mix_frac: float = 0.0):
        """Order for one epoch of a curriculum phase.

        Returns ``(order, admitted)``: the dataset indices (length = one pass) and the admitted
        prefix length for each batch. Shuffled mode draws each batch without replacement from a
        pool of not-yet-used admitted positions, so every admitted instance is visited about
        equally often; newly admitted instances join the pool as the prefix grows, and an
        exhausted pool is refilled with the whole prefix. Strict mode walks the admitted prefix
        in sequence order, wrapping to the start of the sequence when it reaches the prefix end.

        ``mix_frac`` (easy-first mixing): that share of every batch, rounded, is drawn uniformly
        without replacement from the not-yet-admitted rest of the sequence (none once everything
        is admitted); the other rows come from the admitted prefix as above, and the drawn rows sit
        at evenly spaced places of the batch (each rank of a distributed run gets its share). 0
        keeps the orders (and their random streams) exactly as without mixing.
        """
        if isinstance(mix_frac, bool) or not isinstance(mix_frac, (int, float, np.floating)) or \
                not 0.0 <= float(mix_frac) < 1.0:
            raise ValueError(f"mix_frac must be a number in [0, 1), got {mix_frac!r}")
        phase = check_int("phase", phase, 0)
        strict_order = check_bool("strict_order", strict_order)
        seq = self._check_sequence(sequence)
        admitted = self.admitted_counts(pacing, epoch_in_phase, phase_epochs)
        positions = np.empty(int(self.batch_sizes.sum()), dtype=np.int64)
        out = 0
        if strict_order:
            # The cursor carries across epochs of the phase: it is where a continuous walk of the
            # sequence under this pacing would be, recomputed from the phase start for determinism.
            cursor = self._strict_cursor(pacing, epoch_in_phase, phase_epochs, mix_frac)
            mix_rng = _rng(self.seed, _TAG_MIX, phase, epoch_in_phase) if mix_frac else None
            for n, b in zip(admitted, self.batch_sizes):
                k = self._mixed_rows(mix_frac, int(n), int(b))
                a = b - k
                if cursor >= n:
                    cursor = 0
                take = np.arange(cursor, cursor + a) % n
                positions[out:out + a] = take
                if k:
                    positions[out + a:out + b] = n + mix_rng.choice(self.num_items - n, size=k,
                                                                    replace=False)
                    _spread_tail(positions[out:out + b], k)
                cursor = (cursor + a) if cursor + a <= n else (cursor + a) % n
                out += b
        else:
            rng = _rng(self.seed, _TAG_PACED, phase, epoch_in_phase)
            current = int(admitted[0])
            pool = _Pool(rng.permutation(current), self.num_items)
            for n, b in zip(admitted, self.batch_sizes):
                n = int(n)
                k = self._mixed_rows(mix_frac, n, int(b))
                if k:
                    # Drawn before the prefix rows, from the same stream; spread through the batch below.
                    rest = n + rng.choice(self.num_items - n, size=k, replace=False)
                    positions[out + b - k:out + b] = rest
                    b = b - k
                if n > current:
                    pool.extend(np.arange(current, n))
                    current = n
                if pool.size < b:
                    first = pool.remaining()
                    used = np.zeros(current, dtype=bool)
                    used[first] = True
                    fresh = rng.permutation(np.flatnonzero(~used))
                    need = b - first.size
                    chosen = np.concatenate([first, fresh[:need]])
                    # The tail of the old pass rejoins the pool so the next pass covers it too.
                    pool = _Pool(np.concatenate([fresh[need:], first]), self.num_items)
                else:
                    chosen = pool.take(rng.choice(pool.size, size=b, replace=False))
                positions[out:out + b] = chosen
                if k:
                    _spread_tail(positions[out:out + b + k], k)
                out += b + k
        return seq[positions], admitted

    def _check_sequence(self, sequence) -> np.ndarray:
        """``sequence`` as int64 after checking it is a permutation of ``range(num_items)`` (one
        min/max and one bincount: cheap next to the epoch it orders)."""
        n = self.num_items
        seq = np.asarray(host_array(sequence, "sequence"))
        if seq.shape != (n,):
            raise ValueError(f"sequence must have shape ({n},), got {seq.shape}")
        if seq.dtype == np.bool_ or not np.issubdtype(seq.dtype, np.integer):
            raise ValueError(f"sequence must be a permutation of range({n}) and hold integers, "
                             f"got dtype {seq.dtype}")
        lo, hi = seq.min(), seq.max()
        if lo < 0 or hi >= n:
            raise ValueError(f"sequence must be a permutation of range({n}): entry "
                             f"{int(lo if lo < 0 else hi)} is out of range")
        seq = seq.astype(np.int64, copy=False)
        counts = np.bincount(seq, minlength=n)
        if counts.max() > 1:
            dup = int(np.argmax(counts > 1))
            raise ValueError(f"sequence must be a permutation of range({n}): index {dup} is "
                             f"duplicated ({int(counts[dup])} times) and {int((counts == 0).sum())} "
                             "indices are missing")
        return seq

    def _mixed_rows(self, mix_frac: float, admitted: int, batch: int) -> int:
        """Rows of a batch drawn from the not-yet-admitted rest: round(mix_frac * batch), at most
        the rest and at most batch - 1 (every batch keeps at least one admitted row)."""
        if not mix_frac or admitted >= self.num_items:
            return 0
        return int(min(round(mix_frac * batch), self.num_items - admitted, batch - 1))

    def _strict_cursor(self, pacing: Pacing, epoch_in_phase: int, phase_epochs: int,
                       mix_frac: float = 0.0) -> int:
        cursor = 0
        for e in range(epoch_in_phase):
            for n, b in zip(self.admitted_counts(pacing, e, phase_epochs), self.batch_sizes):
                a = b - self._mixed_rows(mix_frac, int(n), int(b))
                if cursor >= n:
                    cursor = 0
                cursor = (cursor + a) if cursor + a <= n else (cursor + a) % n
        return cursor


class _Pool:
    """The shuffled mode's pool of unused admitted positions: a sequence the draws index by rank
    (the r-th entry still in it). A flat array with ``np.delete`` cost O(pool) a batch, so
    O(N^2 / B) an epoch: seconds to tens of seconds before each epoch of a 1.28M-image set, with
    the GPU idle. Here entries are never moved: each sits in a slot with a live flag, and blocks of
    64 slots keep a live count, so finding b ranks and removing them costs O(b * 64 + N / 64).
    The ranks mean the same entries as in the flat array, so the orders are unchanged."""

    block = 64

    def __init__(self, values: np.ndarray, capacity: int):
        slots = -(-max(int(capacity), 1) // self.block) * self.block
        self._values = np.empty(slots, dtype=np.int64)
        self._live = np.zeros(slots, dtype=bool)
        self._counts = np.zeros(slots // self.block, dtype=np.int64)
        self._end = 0    # slots used so far (appended entries, live or taken)
        self.size = 0    # live entries
        self.extend(values)

    def extend(self, values: np.ndarray) -> None:
        """Appends ``values`` after the last entry."""
        lo, hi = self._end, self._end + len(values)
        if hi > self._values.size:
            raise ValueError(f"pool capacity {self._values.size} exceeded ({hi} entries)")
        self._values[lo:hi] = values
        self._live[lo:hi] = True
        first, last = lo // self.block, -(-hi // self.block)
        self._counts[first:last] = self._live.reshape(-1, self.block)[first:last].sum(axis=1)
        self._end, self.size = hi, self.size + len(values)

    def take(self, ranks: np.ndarray) -> np.ndarray:
        """Removes and returns the entries at ``ranks`` (distinct, each in [0, size), all meant
        as ranks before this removal)."""
        used = -(-self._end // self.block)
        counts = self._counts[:used]
        ends = np.cumsum(counts)
        block = np.searchsorted(ends, ranks, side="right")
        within = ranks - (ends[block] - counts[block])
        rows = self._live.reshape(-1, self.block)[block].cumsum(axis=1)
        slot = block * self.block + np.argmax(rows > within[:, None], axis=1)
        out = self._values[slot]
        self._live[slot] = False
        np.subtract.at(self._counts, block, 1)
        self.size -= len(ranks)
        return out

    def remaining(self) -> np.ndarray:
        """The live entries, in order."""
        return self._values[:self._end][self._live[:self._end]]


def _spread_tail(batch: np.ndarray, k: int) -> None:
    """Moves a batch's last ``k`` rows (the easy-first mixing draws) in place to evenly spaced
    slots, keeping both groups' own order. Under torch.distributed each rank trains on a contiguous
    part of the global batch and normalizes it with its own BatchNorm statistics: with the draws at
    the end, the last rank got all of them and the others none."""
    b = batch.size
    mixed = batch[b - k:].copy()
    slots = ((np.arange(k) + 0.5) * b / k).astype(np.int64)  # distinct: b / k > 1
    keep = np.ones(b, dtype=bool)
    keep[slots] = False
    batch[keep] = batch[:b - k].copy()
    batch[slots] = mixed
