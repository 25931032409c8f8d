"""Fused instance_scores kernel vs the eager composite of the six measures, and the whole
snapshot scoring pass (issue 4).

Part 1, the kernel: ``kdseq_fast.instance_scores(s, y, t)`` vs the six measures written as plain
PyTorch reductions (``eager_scores`` below, fp32 accumulation like the kernel), timed round-robin
in one process over (B, C) = (1024, 100), (1024, 1000), (256, 32000), fp32 and bf16; optionally
also ``torch.compile`` of the composite (``--candidates ... compile``).

Part 2, the pass: ``kdseq_fast.scoring.score_dataset`` with a resnet8x4 snapshot on 32x32 inputs
(synthetic images held in memory, so no data loading is timed) and cached teacher logits, in
instances/second; the time spent inside ``instance_scores`` during the pass is measured (CUDA
events on the GPU, so nothing is synchronised that the pass would not synchronise itself) and
reported as its share of the pass, next to the share the eager composite would take.

    python benchmarks/bench_scoring.py                 # CPU
    python benchmarks/bench_scoring.py --quick         # smoke run
    python benchmarks/bench_scoring.py --device cuda --out results/
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import _common as C  # noqa: E402

SHAPES = [(1024, 100), (1024, 1000), (256, 32000)]
QUICK_SHAPES = [(256, 100), (256, 1000)]
CANDIDATES = ("kdseq", "eager", "compile")
TEMPERATURE = 4.0
NEGLIGIBLE_SHARE = 0.01  # our reading of "negligible": under 1% of the pass


def eager_scores(s: torch.Tensor, y: torch.Tensor, t, T: float = TEMPERATURE) -> torch.Tensor:
    """The six SCORE_FIELDS as separate PyTorch reductions, fp32 (what one writes without a kernel)."""
    s = s.float()
    y1 = y.long()[:, None]
    logp = F.log_softmax(s, 1)
    p = logp.exp()
    ce = -logp.gather(1, y1).squeeze(1)
    p_true = p.gather(1, y1).squeeze(1)
    margin = s.gather(1, y1).squeeze(1) - s.scatter(1, y1, float("-inf")).amax(1)
    entropy = -(p * logp).sum(1)
    correct = (s.argmax(1) == y1.squeeze(1)).float()
    if t is not None:
        log_pt = F.log_softmax(t.float() / T, 1)
        kd = (T * T) * (log_pt.exp() * (log_pt - F.log_softmax(s / T, 1))).sum(1)
    else:
        kd = torch.zeros_like(ce)
    return torch.stack([ce, kd, p_true, margin, entropy, correct], 1)


# ---------------------------------------------------------------------------------------------
# part 1: kernel vs eager composite
# ---------------------------------------------------------------------------------------------
def bench_kernel(B, Cn, dtype_name, device, args, gen):
    import kdseq_fast as kf

    dtype = C.DTYPES[dtype_name]
    s = (torch.randn(B, Cn, generator=gen) * 3).to(device=device, dtype=dtype)
    t = (torch.randn(B, Cn, generator=gen) * 3).to(device=device, dtype=dtype)
    y = torch.randint(0, Cn, (B,), generator=gen).to(device)
    calls, errors, compile_s = {}, {}, None
    if "kdseq" in args.candidates:
        # validate=False, as the snapshot pass calls it: validate=True adds a label check and one
        # host read a call, which the eager composite does not pay.
        calls["kdseq"] = lambda: kf.instance_scores(s, y, t, temperature=TEMPERATURE, validate=False)
    if "eager" in args.candidates:
        calls["eager"] = lambda: eager_scores(s, y, t)
    if "compile" in args.candidates:
        try:
            torch._dynamo.reset()
            compiled = torch.compile(eager_scores, dynamic=False)
            C.sync(device)
            t0 = time.perf_counter()
            compiled(s, y, t)
            C.sync(device)
            compile_s = time.perf_counter() - t0
            calls["compile"] = lambda: compiled(s, y, t)
        except Exception as exc:  # a missing C++ toolchain must not sink the other candidates
            errors["compile"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]

    # Sanity against the fp64 reference: columns ce..entropy; `correct` may differ only on ties.
    ref = kf.instance_scores_reference(s, y, t, temperature=TEMPERATURE)
    max_err = {}
    for name, call in calls.items():
        max_err[name] = float((call().double()[:, :5] - ref[:, :5]).abs().max())

    times = C.interleaved_times(calls, device=device, repeats=args.repeats, warmup=args.warmup,
                                desc=f"scores {B}x{Cn} {dtype_name}")
    kernel_s = None
    if device.type == "cuda" and "kdseq" in calls:
        # Kernel only: CUDA events around the dispatcher op (no Python argument checks).
        op = torch.ops.kdseq.instance_scores
        kernel_s = C.summarize(C.cuda_event_times(lambda: op(s, y, t, TEMPERATURE), device,
                                                  repeats=args.repeats))["median_s"]
    eager_med = C.summarize(times["eager"])["median_s"] if "eager" in times else None
    rows = []
    for name, samples in times.items():
        st = C.summarize(samples)
        rows.append({
            "dtype": dtype_name, "B": B, "C": Cn, "candidate": name, **st,
            "rows_per_s": B / st["median_s"],
            "speedup_vs_eager": (eager_med / st["median_s"]) if eager_med else None,
            "max_abs_err_vs_fp64": max_err[name],
            "compile_time_s": compile_s if name == "compile" else None,
            "kernel_s": kernel_s if name == "kdseq" else None,
        })
    return rows, errors


# ---------------------------------------------------------------------------------------------
# part 2: the snapshot pass
# ---------------------------------------------------------------------------------------------
class _ScoringTimer:
    """Wraps ``instance_scores`` as ``kdseq_fast.scoring`` calls it and accumulates its time."""

    def __init__(self, fn, device, keep_inputs):
        self.fn, self.device, self.keep_inputs = fn, device, keep_inputs
        self.seconds, self.events, self.inputs, self.calls = 0.0, [], [], 0

    def __call__(self, student, labels, teacher=None, **kw):
        self.calls += 1
        if self.keep_inputs:
            self.inputs.append((student, labels, teacher))
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.fn(student, labels, teacher, **kw)
            end.record()
            self.events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = self.fn(student, labels, teacher, **kw)
        self.seconds += time.perf_counter() - t0
        return out

    def total_seconds(self) -> float:
        if self.events:
            torch.cuda.synchronize(self.device)
            return self.seconds + sum(a.elapsed_time(b) for a, b in self.events) / 1e3
        return self.seconds


def bench_pass(device, args, gen):
    from kdseq_fast import scoring
    from kdseq_fast.models import get_model

    n, bs, classes = args.pass_items, args.pass_batch, 100
    torch.manual_seed(args.seed)
    model = get_model("resnet8x4", num_classes=classes).to(device).eval()
    images = torch.randn(n, 3, 32, 32, generator=gen)
    labels = torch.randint(0, classes, (n,), generator=gen)
    teacher_logits = torch.randn(n, classes, generator=gen) * 3
    batches = [(images[i:i + bs].to(device), labels[i:i + bs].to(device), torch.arange(i, min(i + bs, n)))
               for i in range(0, n, bs)]

    # Warm-up on each batch shape the pass meets: the first batch and a shorter last one (cuDNN
    # autotuning and allocator growth happen per shape; OpenMP pool start-up once).
    def warm_up(batch):
        images, labels, indices = batch
        k = len(indices)
        scoring.score_dataset(model, [(images, labels, torch.arange(k))], teacher_logits[indices],
                              num_items=k, progress=False)

    warm_up(batches[0])
    if len(batches[-1][2]) != len(batches[0][2]):
        warm_up(batches[-1])

    def forward_only():
        # The same batches through the same model, nothing else: what the pass cannot go below.
        with torch.no_grad(), scoring._autocast(device, None):
            for images, _, _ in batches:
                model(images)

    original = scoring.instance_scores
    passes = []
    captured = None
    try:
        for r in range(args.pass_repeats):
            timer = _ScoringTimer(original, device, keep_inputs=captured is None)
            scoring.instance_scores = timer
            C.sync(device)
            t0 = time.perf_counter()
            scores = scoring.score_dataset(model, batches, teacher_logits, num_items=n,
                                           temperature=TEMPERATURE, progress=args.progress)
            C.sync(device)
            total = time.perf_counter() - t0
            scoring.instance_scores = original
            kernel_s = timer.total_seconds()
            t0 = time.perf_counter()
            forward_only()
            C.sync(device)
            forward_s = time.perf_counter() - t0
            passes.append({"pass_s": total, "scoring_s": kernel_s, "instances_per_s": n / total,
                           "scoring_share": kernel_s / total, "forward_only_s": forward_s,
                           "scoring_calls": timer.calls})
            if captured is None:
                captured = timer.inputs
            print(f"  pass {r + 1}/{args.pass_repeats}: {total:.2f} s, {n / total:.0f} instances/s, "
                  f"instance_scores {1e3 * kernel_s:.2f} ms ({100 * kernel_s / total:.3f}%); "
                  f"forward only {forward_s:.2f} s")
    finally:
        scoring.instance_scores = original
    if not torch.isfinite(scores).all():
        raise RuntimeError("score_dataset returned non-finite scores; the benchmark would be meaningless")

    # What the same per-batch work would cost with the eager composite instead of the kernel.
    def run_eager():
        for s, y, t in captured:
            eager_scores(s, y, t)
    eager_s = C.summarize(C.interleaved_times({"eager": run_eager}, device=device, repeats=3, warmup=1,
                                              min_sample_s=0.0, desc="eager on pass logits")["eager"])["median_s"]
    pass_st = C.summarize([p["pass_s"] for p in passes])
    forward_med = C.summarize([p["forward_only_s"] for p in passes])["median_s"]
    share = C.summarize([p["scoring_share"] for p in passes])["median_s"]
    kernel_med = C.summarize([p["scoring_s"] for p in passes])["median_s"]
    other_s = pass_st["median_s"] - kernel_med
    return {
        "model": "resnet8x4", "input": "3x32x32", "num_classes": classes, "num_items": n, "batch_size": bs,
        "amp": "bf16 autocast (score_dataset default on CUDA)" if device.type == "cuda" else "none (fp32)",
        "passes": passes, "pass_median_s": pass_st["median_s"], "pass_iqr_s": pass_st["iqr_s"],
        "instances_per_s": n / pass_st["median_s"], "scoring_median_s": kernel_med,
        "scoring_share": share, "eager_scoring_s": eager_s,
        "scoring_calls_per_pass": passes[0]["scoring_calls"], "forward_only_median_s": forward_med,
        "pass_overhead_vs_forward": (pass_st["median_s"] - forward_med) / pass_st["median_s"],
        "eager_scoring_share": eager_s / (other_s + eager_s),
        "timing_method": ("CUDA events around each instance_scores call" if device.type == "cuda"
                          else "perf_counter around each instance_scores call"),
    }


def evaluate_targets(rows, pass_result, device):
    targets = []
    if device.type == "cpu":
        for r in rows:
            if r["candidate"] == "kdseq" and r["C"] >= 1000 and r["speedup_vs_eager"] is not None:
                targets.append(C.target(f"{r['dtype']} ({r['B']}, {r['C']}): kernel speed-up vs eager composite",
                                        r["speedup_vs_eager"], 5.0, unit="x"))
    if pass_result is not None:
        targets.append(C.target("scoring share of the resnet8x4 snapshot pass (negligible = < 1%)",
                                100 * pass_result["scoring_share"], 100 * NEGLIGIBLE_SHARE,
                                higher_is_better=False, unit="%"))
    return targets


def build_parser() -> argparse.ArgumentParser:
    """The command line (also parsed by tests/test_check_gpu.py, which checks the prepared GPU
    call's arguments without a GPU)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(ap)
    ap.add_argument("--shapes", nargs="+", type=C.parse_shape, default=None,
                    help="B x C kernel cases (default: the issue's 3 shapes, 2 smaller ones with --quick)")
    ap.add_argument("--candidates", nargs="+", default=["kdseq", "eager"], choices=CANDIDATES,
                    help="kernel candidates; add 'compile' for torch.compile of the composite")
    ap.add_argument("--pass-items", type=int, default=None,
                    help="instances in the snapshot pass (default 1024 on CPU, 50000 on CUDA, 128 with --quick)")
    ap.add_argument("--pass-batch", type=int, default=None, help="batch size of the pass (default 256, 64 with --quick)")
    ap.add_argument("--pass-repeats", type=int, default=None, help="timed passes (default 3, 1 with --quick)")
    ap.add_argument("--no-pass", action="store_true", help="skip part 2 (the snapshot pass)")
    ap.add_argument("--progress", action="store_true", help="tqdm bar inside each pass")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    device = C.resolve_device(args.device)
    C.apply_threads(args.threads)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 15
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.pass_items is None:
        args.pass_items = 128 if args.quick else (50000 if device.type == "cuda" else 1024)
    if args.pass_batch is None:
        args.pass_batch = 64 if args.quick else 256
    if args.pass_repeats is None:
        args.pass_repeats = 1 if args.quick else 3
    for name in ("repeats", "pass_items", "pass_batch", "pass_repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ValueError(f"--warmup must be >= 0, got {args.warmup}")
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)

    info = C.machine_info(device)
    C.print_header("bench_scoring: fused instance_scores and the snapshot scoring pass", info)
    gen = torch.Generator().manual_seed(args.seed)
    rows, errors = [], {}
    for dtype_name in args.dtypes:
        for B, Cn in shapes:
            case_rows, case_errors = bench_kernel(B, Cn, dtype_name, device, args, gen)
            rows += case_rows
            for name, msg in case_errors.items():
                errors[f"{dtype_name} {B}x{Cn} {name}"] = msg
                print(f"  {dtype_name} {B}x{Cn} {name}: skipped ({msg})")
            for r in case_rows:
                print(f"  {dtype_name} {B:>5}x{Cn:<6} {r['candidate']:8s} {C.fmt_time(r['median_s']):>9}  "
                      f"x{r['speedup_vs_eager'] or float('nan'):.2f} vs eager")

    pass_result = None
    if not args.no_pass:
        print(f"snapshot pass: resnet8x4, {args.pass_items} instances of 3x32x32, batch {args.pass_batch}")
        pass_result = bench_pass(device, args, gen)

    targets = evaluate_targets(rows, pass_result, device)
    info["loadavg_end"] = C.load_average()
    cuda = device.type == "cuda"
    table = C.markdown_table(
        ["dtype", "B", "C", "candidate", "median", "IQR", "rows/s", "x eager", "max |err| vs fp64"]
        + (["kernel only"] if cuda else []),
        [[r["dtype"], r["B"], r["C"], r["candidate"], C.fmt_time(r["median_s"]), C.fmt_time(r["iqr_s"]),
          f"{r['rows_per_s']:.3g}", None if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}",
          f"{r['max_abs_err_vs_fp64']:.1e}"] + ([C.fmt_time(r["kernel_s"])] if cuda else []) for r in rows])
    pass_md = []
    if pass_result is not None:
        p = pass_result
        pass_md = [
            f"Snapshot pass ({p['model']}, {p['num_items']} x {p['input']}, batch {p['batch_size']}, "
            f"amp {p['amp']}, {len(p['passes'])} passes): {p['instances_per_s']:.0f} instances/s "
            f"(median pass {C.fmt_time(p['pass_median_s'])}, IQR {C.fmt_time(p['pass_iqr_s'])}); "
            f"instance_scores took {C.fmt_time(p['scoring_median_s'])} = {100 * p['scoring_share']:.3f}% "
            f"of the pass in {p['scoring_calls_per_pass']} call(s) ({p['timing_method']}); the eager "
            f"composite would take {C.fmt_time(p['eager_scoring_s'])} = {100 * p['eager_scoring_share']:.3f}%. "
            f"The same batches through the model alone (no scoring, no index bookkeeping) take "
            f"{C.fmt_time(p['forward_only_median_s'])}: everything the pass adds to the forward passes is "
            f"{100 * p['pass_overhead_vs_forward']:.1f}% of the pass.", ""]
    compile_lines = [f"- {r['dtype']} {r['B']}x{r['C']}: {r['compile_time_s']:.1f} s"
                     for r in rows if r["compile_time_s"] is not None]
    md = "\n".join([
        "# bench_scoring", "", f"`{C.command_line()}`", "",
        f"Machine: {info['cpu_model']}, {info['cpu_cores']} cores ({info['torch_threads']} torch threads)"
        + (f", {info['gpu']}" if "gpu" in info else "")
        + f", torch {info['torch']}, load average {info['loadavg_start']} -> {info['loadavg_end']}; "
        f"kdseq build {info['kdseq_build']}", "",
        f"Kernel: teacher logits given (kd column at T = {TEMPERATURE}); {args.repeats} interleaved samples "
        f"per candidate after {args.warmup} warm-up calls.", "",
        table, "",
        *(["torch.compile compile time (excluded above):", *compile_lines, ""] if compile_lines else []),
        *([f"Skipped: {k}: {v}" for k, v in errors.items()] + [""] if errors else []),
        *pass_md,
        "Targets:", "", *[f"- {line}" for line in C.format_targets(targets)],
    ])
    print()
    print(table)
    print()
    if pass_md:
        print(pass_md[0])
    for line in C.format_targets(targets):
        print(line)
    payload = {"benchmark": "scoring", "command": C.command_line(), "machine": info,
               "temperature": TEMPERATURE, "repeats": args.repeats, "warmup": args.warmup,
               "rows": rows, "pass": pass_result, "targets": targets, "errors": errors}
    for path in C.write_outputs(args.out, "bench_scoring", payload, md):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(C.script_main(main))
