"""Does ISL-KD help? Test accuracy of ce / kd / isl students over several seeds, plus ISL ablations.

For one config: trains the teacher once (or reuses ``--teacher``), then every variant (ce, kd,
isl and the chosen ISL ablations) with the same seeds, the same initial students and the same step
budget, through the package's own trainer. Reports, per variant, mean +- std test accuracy over
seeds, the paired difference to kd with a 95% confidence interval (Student t over seeds), the steps
needed to reach the kd student's final accuracy (same seed), and wall time; as markdown, JSON and a
plot of test accuracy against steps with a band of +-1 std over seeds. PASS/MISS lines state the
method's two claims as measured: "isl - kd, lower end of the 95% CI > 0" and "isl reaches the kd
student's final accuracy in fewer steps".

Finished runs are reused when the command is run again (each run resumes from its checkpoint, a
complete one is skipped), so an interrupted benchmark continues where it stopped. ``--reuse DIR``
also copies finished runs from an earlier ``--out`` when they are the same run (method, the
settings that change its result, seed and teacher): e.g. the kd baseline, which no curriculum
setting changes, for an ablation of a curriculum default in a new directory.

    # Fashion-MNIST on a 2-core CPU (20,000-image subset, 3 seeds, the order ablation):
    python benchmarks/bench_accuracy.py --config configs/fashion_mnist_resnet20_resnet8_cpu.yaml \\
        --seeds 0 1 2 --ablation order --out results/fmnist_cpu
    # on a GPU: all 60,000 images, 5 seeds, every ablation
    python benchmarks/bench_accuracy.py --config configs/fashion_mnist_resnet20_resnet8.yaml \\
        --device cuda --seeds 0 1 2 3 4 --ablation all --out results/fmnist_gpu
    # CI smoke: a tiny schedule on the offline digits recipe
    python benchmarks/bench_accuracy.py --config digits_quick --quick --out /tmp/acc
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ABLATIONS = ("order", "measure", "pacing", "start_frac", "phases", "reading")


@dataclass
class Variant:
    """One column of the comparison: a method plus config overrides, run once per seed."""
    name: str
    method: str
    overrides: list = field(default_factory=list)

    @property
    def dirname(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]+", "-", self.name).strip("-")


def ablation_variants(kind: str, cfg) -> list[Variant]:
    """ISL variants that change one choice of the default ``isl`` run."""
    cur = cfg.curriculum
    out = []
    if kind == "order":
        for order in ("anti", "random"):
            out.append(Variant(f"isl:order={order}", "isl", [f"curriculum.order={order}"]))
    elif kind == "measure":
        for m in ("kd", "-margin", "entropy", "ce+0.5*kd"):
            if m != cur.measure:
                out.append(Variant(f"isl:measure={m}", "isl", [f"curriculum.measure={m}"]))
    elif kind == "pacing":
        for p in ("linear", "root", "step", "exp"):
            if p != cur.pacing:
                out.append(Variant(f"isl:pacing={p}", "isl", [f"curriculum.pacing={p}"]))
    elif kind == "start_frac":
        for b in (0.1, 0.5):
            if b != cur.start_frac:
                out.append(Variant(f"isl:start_frac={b}", "isl", [f"curriculum.start_frac={b}"]))
    elif kind == "phases":
        rest = cfg.optim.epochs - cur.warmup_epochs - cur.final_full_epochs
        for p in sorted({1, rest} | {d for d in (2, 3, 5) if rest % d == 0}):
            if p != cur.num_phases and rest % p == 0:
                out.append(Variant(f"isl:phases={p}", "isl", [f"curriculum.num_phases={p}"]))
    elif kind == "reading":
        # The readings of "instance-level sequence" that DESIGN.md asks the measurements to decide.
        out.append(Variant("isl:ordered", "isl", ["curriculum.pacing=full",
                                                  "curriculum.strict_order=true",
                                                  "curriculum.mix_frac=0.0"]))
        # The other two readings, each against the configured one (the packaged default is
        # easy-first mixing with mix_frac 0.2, measured best: README).
        mix = float(cur.mix_frac)
        if mix != 0.0:
            out.append(Variant("isl:paced", "isl", ["curriculum.mix_frac=0.0"]))
        else:
            out.append(Variant("isl:mixing", "isl", ["curriculum.mix_frac=0.2"]))
    else:
        raise ValueError(f"--ablation must be one of {', '.join(ABLATIONS)}, all; got {kind!r}")
    return out


def parse_variant(spec: str) -> Variant:
    """``NAME=key=value,key=value``; the method is isl unless the overrides set ``method=``."""
    if "=" not in spec:
        raise ValueError(f"--variant {spec!r} must look like NAME=key=value[,key=value...]")
    name, rest = spec.split("=", 1)
    overrides = [o.strip() for o in rest.split(",") if o.strip()]
    method = "isl"
    for o in list(overrides):
        if o.startswith("method="):
            method = o.split("=", 1)[1]
            overrides.remove(o)
    if method not in ("ce", "kd", "isl"):
        raise ValueError(f"--variant {spec!r}: method must be ce, kd or isl")
    return Variant(name, method, overrides)


QUICK_OVERRIDES = ["optim.epochs=4", "optim.lr_decay_epochs=[3]", "curriculum.warmup_epochs=1",
                   "curriculum.num_phases=1", "curriculum.final_full_epochs=2",
                   "teacher.epochs=3", "data.train_subset=512", "train.tensorboard=false"]


# ---------------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------------
# Every df up to 30, then 40, 60, 120 (scipy is only in the test extra).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
         10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
         18: 2.101, 19: 2.093, 20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
         26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t_quantile_975(df: int) -> float:
    """Two-sided 95% Student t quantile (scipy when installed, else a table: exact up to df 30;
    between the table's larger entries the one for the next smaller df, which widens the interval
    a little rather than narrowing it)."""
    try:
        from scipy.stats import t
        return float(t.ppf(0.975, df))
    except ImportError:
        return _T975[max(k for k in _T975 if k <= max(int(df), 1))]


def mean_ci(values) -> dict:
    """Mean, sample std and the 95% t interval of the mean (None bounds for fewer than 2)."""
    x = np.asarray(values, dtype=np.float64)
    n = int(x.size)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "ci_low": None, "ci_high": None}
    mean = float(x.mean())
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "ci_low": None, "ci_high": None}
    std = float(x.std(ddof=1))
    half = t_quantile_975(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half}


def steps_to(history, target) -> int | None:
    for steps, acc in history:
        if acc >= target - 1e-12:
            return int(steps)
    return None


# ---------------------------------------------------------------------------------------------
# runs
# ---------------------------------------------------------------------------------------------
def read_run(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "summary.json")) as fh:
        summary = json.load(fh)
    (method, entry), = summary["methods"].items()
    history = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("test_acc") is not None:
                history.append((int(rec["steps"]), float(rec["test_acc"])))
    return {"method": method, "test_acc": float(entry["test_acc"]), "steps": int(entry["steps"]),
            "wall_s": float(entry["wall_s"]), "history": history,
            "teacher_acc": summary.get("teacher", {}).get("test_acc")}


def analyse(variants: list[Variant], seeds: list[int], runs: dict) -> dict:
    """Per-variant statistics; differences and steps are paired with kd by seed."""
    out = {}
    kd = {s: runs.get(("kd", s)) for s in seeds}
    for v in variants:
        rs = {s: runs[(v.name, s)] for s in seeds if (v.name, s) in runs}
        accs = [rs[s]["test_acc"] for s in sorted(rs)]
        entry = {"method": v.method, "overrides": v.overrides, "seeds": sorted(rs),
                 "test_acc": mean_ci(accs), "per_seed_acc": {s: rs[s]["test_acc"] for s in rs},
                 "wall_s": mean_ci([rs[s]["wall_s"] for s in rs])}
        paired = [s for s in rs if kd.get(s) is not None]
        if v.name != "kd" and paired:
            diffs = [rs[s]["test_acc"] - kd[s]["test_acc"] for s in paired]
            entry["diff_vs_kd"] = mean_ci(diffs)
            entry["per_seed_diff_vs_kd"] = {s: d for s, d in zip(paired, diffs)}
        if paired:
            per_seed = {}
            for s in paired:
                target = kd[s]["test_acc"]
                per_seed[s] = {"target": target, "steps": steps_to(rs[s]["history"], target),
                               "kd_steps": steps_to(kd[s]["history"], target)}
            reached = [p for p in per_seed.values() if p["steps"] is not None]
            # kd's steps over the same seeds as the variant's mean (the seeds where it reached the
            # target), else over all: means over different seeds are not comparable.
            same = reached or list(per_seed.values())
            entry["steps_to_kd_final"] = {
                "per_seed": per_seed, "reached": len(reached), "of": len(per_seed),
                "mean_steps": float(np.mean([p["steps"] for p in reached])) if reached else None,
                "kd_mean_steps": float(np.mean([p["kd_steps"] for p in same])),
            }
        out[v.name] = entry
    return out


def claims(stats: dict) -> list[tuple[str, bool | None, str]]:
    """The two claims of the method, for the default isl run, as (text, passed, detail)."""
    isl = stats.get("isl")
    rows = []
    d = isl.get("diff_vs_kd") if isl else None
    if d is None or d["ci_low"] is None:
        rows.append(("isl - kd, lower end of the 95% CI > 0", None,
                     "needs kd and isl on at least 2 shared seeds"))
    else:
        rows.append(("isl - kd, lower end of the 95% CI > 0", d["ci_low"] > 0,
                     f"mean {d['mean'] * 100:+.2f} pts, 95% CI [{d['ci_low'] * 100:+.2f}, "
                     f"{d['ci_high'] * 100:+.2f}] over {d['n']} seeds"))
    st = isl.get("steps_to_kd_final") if isl else None
    if st is None:
        rows.append(("isl reaches the kd student's final accuracy in fewer steps", None,
                     "needs kd and isl runs"))
    else:
        ok = st["reached"] == st["of"] and st["mean_steps"] is not None and \
            st["mean_steps"] < st["kd_mean_steps"]
        got = "never" if st["mean_steps"] is None else f"{st['mean_steps']:.0f}"
        rows.append(("isl reaches the kd student's final accuracy in fewer steps", ok,
                     f"isl reached it in {st['reached']}/{st['of']} seeds, mean step {got}; "
                     f"kd itself at mean step {st['kd_mean_steps']:.0f}"))
    return rows


def _pct(x, digits=2):
    return "-" if x is None else f"{x * 100:.{digits}f}"


def markdown(stats: dict, teacher: dict, header: dict) -> str:
    lines = [f"# Accuracy benchmark: {header['config']}", "",
             f"command: `{header['command']}`  ", f"date: {header['date']}  ",
             f"machine: {header['machine']}  ",
             f"seeds: {header['seeds']}; teacher {teacher.get('arch')} test acc "
             f"{_pct(teacher.get('test_acc'))}%", "",
             "| variant | seeds | test acc % (mean ± std) | Δ vs kd, pts (95% CI) | "
             "steps to kd's final acc (reached) | kd's own steps, same seeds | wall s |",
             "|---|---|---|---|---|---|---|"]
    for name, e in stats.items():
        a = e["test_acc"]
        acc = f"{_pct(a['mean'])} ± {_pct(a['std'])}" if a["std"] is not None else _pct(a["mean"])
        d = e.get("diff_vs_kd")
        if d is None:
            diff = "-"
        elif d["ci_low"] is None:
            diff = f"{d['mean'] * 100:+.2f}"
        else:
            diff = f"{d['mean'] * 100:+.2f} [{d['ci_low'] * 100:+.2f}, {d['ci_high'] * 100:+.2f}]"
        st = e.get("steps_to_kd_final")
        if st is None:
            steps = kd_steps = "-"
        else:
            steps = ("never" if st["mean_steps"] is None else f"{st['mean_steps']:.0f}") + \
                f" ({st['reached']}/{st['of']})"
            kd_steps = f"{st['kd_mean_steps']:.0f}"
        wall = e["wall_s"]["mean"]
        wall = "-" if wall is None else f"{wall:.0f}"
        seeds = str(len(e["seeds"]))
        if d is not None and d["n"] != len(e["seeds"]):
            seeds += f" ({d['n']} with kd)"  # Δ covers only the seeds kd ran too
        lines.append(f"| {name} | {seeds} | {acc} | {diff} | {steps} | {kd_steps} | {wall} |")
    lines.append("")
    for text, ok, detail in claims(stats):
        verdict = "n/a" if ok is None else ("PASS" if ok else "MISS")
        lines.append(f"- {verdict}: {text} ({detail})")
    return "\n".join(lines) + "\n"


def plot(stats: dict, runs: dict, seeds, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    upper = 0.0
    for name in stats:
        hists = [runs[(name, s)]["history"] for s in seeds if (name, s) in runs]
        if not hists:
            continue
        n = min(len(h) for h in hists)
        steps = np.array([h[i][0] for i in range(n) for h in hists[:1]])
        accs = np.array([[h[i][1] for i in range(n)] for h in hists]) * 100
        mean = accs.mean(0)
        (line,) = ax.plot(steps, mean, label=f"{name} ({len(hists)} seeds)")
        std = accs.std(0, ddof=1) if len(hists) > 1 else np.zeros_like(mean)
        if len(hists) > 1:
            # The line's colour: fill_between draws from its own cycle, which a one-seed
            # variant (a line, no band) would put out of step with the lines.
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2, color=line.get_color())
        upper = max(upper, float((mean + std).max()))
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    # The interesting part is the end: zoom on the top of the curves.
    tops = [runs[k]["test_acc"] * 100 for k in runs]
    if tops:
        ax.set_ylim(max(0.0, min(tops) - 6), min(100.0, max(max(tops), upper) + 1))
    fig.tight_layout()
    from kdseq_fast.reports import save_figure
    save_figure(fig, path, dpi=120)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------
def reusable_run(dirs, seed: int, method: str, cfg, teacher_fingerprint) -> str | None:
    """A finished run under ``DIR/runs/*/seed<seed>`` of one of ``dirs`` that is this run: same
    method and result-changing settings (the run directory's identity) and, unless ``ce``, the same
    teacher weights (``teacher_fingerprint``; a path can hold other weights by now). None when
    there is none."""
    from kdseq_fast.run_dir import completed_state

    for d in dirs:
        for cand in sorted(glob.glob(os.path.join(d, "runs", "*", f"seed{seed}"))):
            state = completed_state(cand, "student", method, cfg)
            if state is None:
                continue
            if method == "ce" or (teacher_fingerprint is not None
                                  and state.get("teacher_fingerprint") == teacher_fingerprint):
                return cand
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.split("\n")[1:]))
    ap.add_argument("--config", required=True, help="recipe (path or packaged name)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every run (repeatable)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["ce", "kd", "isl"], choices=("ce", "kd", "isl"))
    ap.add_argument("--ablation", action="append", default=[],
                    help=f"ISL ablation grid(s): {', '.join(ABLATIONS)} or all (repeatable)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=KEY=VALUE,...",
                    help="an extra variant, e.g. isl-root=curriculum.pacing=root (repeatable)")
    ap.add_argument("--teacher", help="teacher checkpoint to reuse (default: train one in OUT/teacher)")
    ap.add_argument("--teacher-data", choices=("full", "subset"), default="full",
                    help="train the teacher on the full training split (default) or on the "
                         "students' data.train_subset")
    ap.add_argument("--device", default=None, help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 4 epochs on a 512-image subset, teacher 3 epochs")
    ap.add_argument("--out", required=True, help="results directory (reused runs live here)")
    ap.add_argument("--report-only", action="store_true",
                    help="only summarize the finished runs in --out (no training)")
    ap.add_argument("--reuse", action="append", default=[], metavar="DIR",
                    help="an earlier --out: its finished runs that are the same run (method, result-"
                         "changing settings, seed, teacher) are copied instead of trained (repeatable)")
    ap.add_argument("--quiet", action="store_true",
                    help="one line per finished run only (default: also each run's epoch lines)")
    args = ap.parse_args(argv)

    import torch

    from _common import command_line, machine_info
    from kdseq_fast.cli import find_config
    from kdseq_fast.config import load_config
    from kdseq_fast.run_inputs import build_data
    from kdseq_fast.runs import distill, train_teacher

    if args.threads:
        torch.set_num_threads(args.threads)
    base_overrides = list(args.overrides)
    if args.quick:
        base_overrides = QUICK_OVERRIDES + base_overrides
    if args.device:
        base_overrides.append(f"device={args.device}")
    config_path = find_config(args.config)
    cfg = load_config(config_path, base_overrides)
    kinds = list(ABLATIONS) if "all" in args.ablation else args.ablation
    variants = [Variant(m, m) for m in args.methods]
    for kind in kinds:
        variants += ablation_variants(kind, cfg)
    variants += [parse_variant(v) for v in args.variant]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise SystemExit(f"error: duplicate variant names in {names}")
    needs_teacher = any(v.method != "ce" for v in variants)
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "bench.log")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with open(log_path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")

    log(f"command: {command_line()}")
    teacher_path = args.teacher
    teacher_entry = {"arch": cfg.teacher.arch}
    if needs_teacher and teacher_path is None and not args.report_only:
        t_overrides = base_overrides + (["data.train_subset=null"] if args.teacher_data == "full" else [])
        t_cfg = load_config(config_path, t_overrides)
        log(f"teacher {t_cfg.teacher.arch}: training into {args.out}/teacher "
            f"({'full training split' if args.teacher_data == 'full' else 'student subset'})")
        res = train_teacher(t_cfg, os.path.join(args.out, "teacher"), resume=True, quiet=True,
                            log=lambda m: log("  " + m))
        teacher_path = res.weights_path
        teacher_entry = res.summary["teacher"]
    elif teacher_path is None:
        teacher_path = os.path.join(args.out, "teacher", "teacher.pt")
    data = None if args.report_only else build_data(cfg, progress=False if args.quiet else None)
    teacher_fp = None
    if args.reuse and needs_teacher and data is not None and os.path.isfile(teacher_path):
        from kdseq_fast.run_inputs import load_teacher
        from kdseq_fast.scoring import teacher_fingerprint

        teacher_fp = teacher_fingerprint(load_teacher(cfg, os.path.abspath(teacher_path), data.num_classes,
                                                      in_channels=data.in_channels))
    runs = {}
    total = len(variants) * len(args.seeds)
    done = 0
    t_start = time.perf_counter()
    for seed in args.seeds:   # seed-major: an interrupted benchmark still has paired results
        for v in variants:
            run_dir = os.path.join(args.out, "runs", v.dirname, f"seed{seed}")
            done += 1
            if not args.report_only:
                v_cfg = load_config(config_path, base_overrides + v.overrides + [f"seed={seed}"])
                if args.reuse and not os.path.exists(os.path.join(run_dir, "run.json")):
                    src = reusable_run(args.reuse, seed, v.method, v_cfg, teacher_fp)
                    if src is not None:
                        # Copied beside it and renamed into place: a copy killed midway is no run.
                        part = run_dir + ".reuse-partial"
                        shutil.rmtree(part, ignore_errors=True)
                        shutil.copytree(src, part)
                        shutil.rmtree(run_dir, ignore_errors=True)  # holds no run.json: no run
                        os.replace(part, run_dir)
                        log(f"{v.name} seed {seed}: reusing the finished run in {src}")
                t0 = time.perf_counter()
                distill(v_cfg, run_dir, method=v.method,
                        teacher=teacher_path if v.method != "ce" else None, resume=True,
                        quiet=True, log=(lambda m: None) if args.quiet else (lambda m: log("    " + m)),
                        data=data)
                elapsed = time.perf_counter() - t0
            if not os.path.exists(os.path.join(run_dir, "summary.json")):
                continue
            r = runs[(v.name, seed)] = read_run(run_dir)
            if r.get("teacher_acc") is not None:
                teacher_entry.setdefault("test_acc", r["teacher_acc"])
            if not args.report_only:
                eta = (time.perf_counter() - t_start) / done * (total - done)
                log(f"{done}/{total} {v.name} seed {seed}: test acc {r['test_acc']:.4f} "
                    f"({elapsed:.0f} s; about {eta / 60:.0f} min left)")
    if not runs:
        print(f"bench_accuracy: no finished runs under {os.path.join(args.out, 'runs')} for these "
              "variants and seeds", file=sys.stderr)
        return 1
    stats = analyse(variants, args.seeds, runs)
    device = torch.device(cfg.device if cfg.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    info = machine_info(device)
    machine = (f"{info['cpu_model']} ({info['cpu_cores']} cores)" +
               (f", {info['gpu']}" if "gpu" in info else "") + f", torch {info['torch']}")
    header = {"config": os.path.relpath(config_path), "command": command_line(),
              "date": time.strftime("%Y-%m-%d"), "machine": machine, "seeds": args.seeds,
              "overrides": base_overrides}
    md = markdown(stats, teacher_entry, header)
    from kdseq_fast.atomic_files import atomic_write_bytes  # a kill here keeps the earlier results
    atomic_write_bytes(md.encode(), os.path.join(args.out, "results.md"))
    atomic_write_bytes(json.dumps({"header": header, "teacher": teacher_entry, "variants": stats,
                                   "claims": [{"claim": c, "pass": ok, "detail": d} for c, ok, d in claims(stats)],
                                   "machine": info}, indent=2, default=str).encode(),
                       os.path.join(args.out, "results.json"))
    if runs:
        plot(stats, runs, args.seeds, os.path.join(args.out, "accuracy_vs_steps.png"))
    print()
    print(md)
    print(f"results: {os.path.join(args.out, 'results.md')}, results.json, accuracy_vs_steps.png")
    return 0


if __name__ == "__main__":
    from _common import script_main

    sys.exit(script_main(main, on_preempt="Run the same command again to continue: finished runs are kept, "
                         "the interrupted one resumes from its checkpoint",
                         run_dir_hint="bench_accuracy has no --overwrite: choose another --out, or remove "
                         "that run's folder to train it again"))
