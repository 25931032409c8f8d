"""The run's epoch plan: which phase each global epoch belongs to and the index order it trains on.

``isl`` runs, in global epochs::

    warm-up (uniform KD) | phase 1 | ... | phase P | final full-data epochs
                         ^ snapshot -> score -> order, at the start of every phase

``ce`` and ``kd`` (and teacher training) are one long uniform phase. Every order is a pure function
of (seed, phase, epoch) and the phase's instance sequence, so a resumed run regenerates exactly
the order it was following (nothing of it is stored).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .config import Config, phase_epochs
from .curriculum import OrderGenerator, Pacing

__all__ = ["Epoch", "EpochPlan"]


class Epoch(NamedTuple):
    phase: int            # 0 = warm-up (or the whole run for ce/kd), 1..P curriculum, P+1 final
    kind: str             # "uniform" or "curriculum"
    epoch_in_phase: int
    phase_len: int


class EpochPlan:
    """Epochs of one run and their orders (see the module docstring)."""

    def __init__(self, cfg: Config, *, method: str, total_epochs: int, num_items: int):
        self.cfg = cfg
        cur = cfg.curriculum
        if method != "isl":
            self.epochs = [Epoch(0, "uniform", e, total_epochs) for e in range(total_epochs)]
        else:
            pe = phase_epochs(cfg)
            plan = [Epoch(0, "uniform", e, cur.warmup_epochs) for e in range(cur.warmup_epochs)]
            for k in range(1, cur.num_phases + 1):
                plan += [Epoch(k, "curriculum", e, pe) for e in range(pe)]
            plan += [Epoch(cur.num_phases + 1, "uniform", e, cur.final_full_epochs)
                     for e in range(cur.final_full_epochs)]
            if len(plan) != total_epochs:
                raise ValueError(f"epoch accounting: the curriculum plans {len(plan)} epochs, the run "
                                 f"has {total_epochs}")
            self.epochs = plan
        self.num_items = num_items
        self.orders = OrderGenerator(num_items, cfg.optim.batch_size, seed=cfg.seed)
        self.pacing = Pacing(cur.pacing, cur.start_frac, cur.full_at)

    def __len__(self) -> int:
        return len(self.epochs)

    def __getitem__(self, e: int) -> Epoch:
        return self.epochs[e]

    @property
    def steps_per_epoch(self) -> int:
        return self.orders.steps_per_epoch

    def order(self, e: int, sequence) -> tuple[np.ndarray, np.ndarray]:
        """(dataset indices of epoch ``e``, admitted prefix length before each batch)."""
        phase, kind, eip, plen = self.epochs[e]
        if kind == "curriculum":
            cur = self.cfg.curriculum
            return self.orders.paced_epoch(sequence, self.pacing, phase=phase, epoch_in_phase=eip,
                                           phase_epochs=plen, strict_order=cur.strict_order,
                                           mix_frac=cur.mix_frac)
        full = np.full(self.steps_per_epoch, self.num_items, dtype=np.int64)
        return self.orders.uniform_epoch(phase, e), full

    def pacing_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(global step, admitted fraction) over the whole run, for the pacing plot."""
        steps, fracs = [], []
        s = 0
        for phase, kind, eip, plen in self.epochs:
            if kind == "curriculum":
                n = self.orders.admitted_counts(self.pacing, eip, plen) / self.num_items
            else:
                n = np.ones(self.steps_per_epoch)
            steps.append(s + 1 + np.arange(n.size))
            fracs.append(n)
            s += n.size
        return np.concatenate(steps), np.concatenate(fracs)
