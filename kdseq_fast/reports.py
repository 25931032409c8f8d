"""Plots and tables for training runs (matplotlib with the non-interactive Agg backend)."""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Iterable

import numpy as np

from .atomic_files import atomic_write

__all__ = ["steps_to_target", "accuracy_target", "read_metrics", "plot_accuracy", "plot_pacing", "plot_difficulty_histograms",
           "save_figure", "format_table", "results_table_rows"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    return plt


def steps_to_target(history: Iterable[tuple[int, float]], target: float | None) -> int | None:
    """First evaluated step whose test accuracy reaches ``target`` (None if never / no target)."""
    if target is None:
        return None
    for steps, acc in history:
        # A hair of tolerance: the kd baseline must reach its own final accuracy at its last step.
        if acc >= target - 1e-12:
            return int(steps)
    return None


def accuracy_target(value: float | None) -> float | None:
    """``train.target_acc`` as a fraction (a config may give a percentage); None stays None."""
    return value / 100.0 if value is not None and value > 1 else value


def read_metrics(path: str) -> list[dict]:
    """Records of a ``metrics.jsonl`` file ([] when absent). Unreadable lines (a torn last line
    after a crash mid-write) are skipped, not taken as the end of the file: the records after one
    are kept."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


def save_figure(fig, path: str, dpi: int = 110) -> None:
    """Writes ``fig`` to ``path`` (format from its extension) whole or not at all, and closes it:
    a run killed while it draws keeps the previous plot, not a torn file."""
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    try:
        atomic_write(path, lambda fh: fig.savefig(fh, dpi=dpi, format=fmt))
    finally:
        _pyplot().close(fig)


def plot_accuracy(records_by_method: dict[str, list[dict]], path: str,
                  target: float | None = None) -> str:
    """Test accuracy vs optimizer steps, one line per method (dashed line at ``target``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, records in records_by_method.items():
        pts = [(r["steps"], r["test_acc"]) for r in records if r.get("test_acc") is not None]
        if pts:
            x, y = zip(*pts)
            ax.plot(x, y, marker="o", markersize=3, label=method)
    if target is not None:
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:.4f}")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("test accuracy")
    ax.set_title("test accuracy vs steps")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    return path


def plot_pacing(steps: np.ndarray, fraction: np.ndarray, path: str, title: str = "pacing") -> str:
    """Admitted fraction of the instance sequence vs global step."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(steps, fraction, linewidth=1.2)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("admitted fraction g")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)
    return path


def plot_difficulty_histograms(run_dir: str, measure: str, path: str) -> str | None:
    """Histogram of the difficulty measure per phase, from ``phase_K_scores.npy`` files."""
    from .scoring import difficulty

    files = glob.glob(os.path.join(run_dir, "phase_*_scores.npy"))
    phases = sorted((int(re.search(r"phase_(\d+)_scores", f).group(1)), f) for f in files)
    if not phases:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    import torch

    diffs = [(k, np.asarray(difficulty(torch.from_numpy(np.load(f)), measure)))
             for k, f in phases]
    lo = min(float(d.min()) for _, d in diffs)
    hi = max(float(d.max()) for _, d in diffs)
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 40)
    for k, d in diffs:
        ax.hist(d, bins=bins, histtype="step", linewidth=1.3, label=f"phase {k}")
    ax.set_xlabel(f"difficulty ({measure})")
    ax.set_ylabel("instances")
    ax.set_yscale("log")
    ax.set_title("difficulty of the training set at each phase snapshot")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    return path


def results_table_rows(summary: dict) -> list[list[str]]:
    rows = []
    t = summary.get("teacher") or {}
    if t.get("test_acc") is not None:
        best = t.get("best_acc")
        rows.append([f"teacher ({t.get('arch', '?')})", f"{t['test_acc']:.4f}",
                     f"{best:.4f}" if best is not None else "-",
                     str(t.get("steps", "-")),
                     f"{t['wall_s']:.1f}" if t.get("wall_s") is not None else "-"])
    for m, e in summary.get("methods", {}).items():
        stt = e.get("steps_to_target")
        # No target (no kd run to set it, no train.target_acc): nothing was missed.
        reached = "no target" if e.get("target_acc") is None else \
            f"target at {stt if stt is not None else 'never'}"
        rows.append([m, f"{e['test_acc']:.4f}", f"{e['best_acc']:.4f}", f"{e['steps']} ({reached})",
                     f"{e['wall_s']:.1f}"])
    return rows


def format_table(summary: dict) -> str:
    """Plain-text table: test accuracy, best accuracy, steps (to target), wall seconds."""
    header = ["run", "test acc", "best acc", "steps (to target)", "wall s"]
    rows = [header] + results_table_rows(summary)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths))  # noqa: E731
    target = next((e.get("target_acc") for e in summary.get("methods", {}).values()
                   if e.get("target_acc") is not None), None)
    out = [fmt(header), line] + [fmt(r) for r in rows[1:]]
    if target is not None:
        out.append(f"target accuracy for steps_to_target: {target:.4f}")
    return "\n".join(out)
