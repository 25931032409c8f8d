"""Forward+backward of the fused KD loss vs PyTorch eager vs torch.compile (issues 3 and 14).

For every (B, C) shape and dtype the candidates are timed round-robin in one process:

- ``kdseq``   ``kdseq_fast.kd_loss(s, t, temperature=T)`` (mean over rows, T^2-scaled KL)
- ``eager``   ``F.kl_div(F.log_softmax(s/T, 1), F.softmax(t/T, 1), reduction="none").sum(1).mean() * T^2``
- ``compile`` ``torch.compile`` of the eager expression (compile time excluded from the timings,
              reported separately)
- ``liger``   Liger-Kernel's ``LigerKLDIVLoss`` on the log-softmaxed student (CUDA, when installed)
- ``kdseq[SPEC]`` with ``--plans SPEC ...`` (CUDA): ``kdseq`` with the kernel planner adjusted by
              ``torch.ops.kdseq._force_plan(SPEC)``, e.g. ``prefer=staged``: a candidate layout
              measured through the whole call, with the same targets as ``kdseq``

Each timed call is loss + ``torch.autograd.grad`` w.r.t. the student. Reported per row: median and
IQR, effective GB/s = 3*B*C*bytes / time (read s and t, write the gradient), that as a fraction
of the memcpy bandwidth measured in the same run (the roofline), speed-up vs eager, and the peak
extra memory of one call. On CUDA more columns: the GPU time of the whole fwd+bwd call (CUDA
events around it, so host overhead between launches shows only as idle GPU time), the same call
replayed from a CUDA graph (the GPU's own time, no host launch work at all; what a graphed
training step pays) with its fraction of memcpy, and, for kdseq, the kernel-only time (CUDA events
around the forward op, which writes loss and gradient; backward is an in-place scale that returns
at once for a grad_output of 1) with the kernel layout the planner chose for it
(``torch.ops.kdseq._last_plan()``). The (256, 100) and (16, 131072) targets use the graph replay
(kdseq only; a problem with C >= 1000 smaller than three times the L2 cache is replayed over enough
copies of its inputs, at most 64, that they come from HBM). Each case's target lines are printed as soon as it is measured,
and at the end every issue-14 shape and dtype that was not measured prints NOT RUN.

    python benchmarks/bench_kd_loss.py                       # CPU, all shapes, fp32 + bf16
    python benchmarks/bench_kd_loss.py --quick               # smoke run
    python benchmarks/bench_kd_loss.py --device cuda --out results/
    python benchmarks/bench_kd_loss.py --device cuda --shapes 4096x32000 --plans prefer=staged
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import _common as C  # noqa: E402

SHAPES = [(64, 100), (256, 100), (256, 1000), (1024, 1000), (64, 32000), (512, 32000), (16, 131072)]
# The GPU adds the large problems the memory-bandwidth targets are about (C >= 4096 and
# B*C >= 2^25; (8192, 4096) is that region's smallest corner).
CUDA_SHAPES = SHAPES + [(8192, 4096), (4096, 32000), (4096, 131072), (16384, 32000)]
QUICK_SHAPES = [(64, 100), (256, 1000)]
CANDIDATES = ("kdseq", "eager", "compile", "liger")
TEMPERATURE = 4.0


def eager_kd(s: torch.Tensor, t: torch.Tensor, T: float = TEMPERATURE) -> torch.Tensor:
    return F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="none").sum(1).mean() * (T * T)


def liger_loss_fn():
    """A KD loss built on LigerKLDIVLoss, or None when Liger-Kernel is not installed."""
    try:
        from liger_kernel.transformers import LigerKLDIVLoss
    except Exception:  # not installed, or built for another torch/triton: the peer is skipped
        return None
    kl = LigerKLDIVLoss(reduction="batchmean", log_target=False)

    def loss(s, t, T=TEMPERATURE):
        return kl(F.log_softmax(s / T, 1), F.softmax(t / T, 1)) * (T * T)
    return loss


def planned_kd(spec: str):
    """kdseq's loss with the CUDA kernel planner adjusted by a _force_plan spec for each call
    (planning happens on the calling thread in the forward, so a CUDA graph captures that layout)."""
    import kdseq_fast as kf

    def loss(s, t):
        with C.forced_plan(spec):
            return kf.kd_loss(s, t, temperature=TEMPERATURE)
    return loss


def kdseq_op_call(s, t, spec: str):
    """The forward op alone (loss and gradient in one launch sequence), under a plan spec."""
    def call():
        with C.forced_plan(spec):
            return torch.ops.kdseq.kd_loss(s, t, None, TEMPERATURE, 1.0, 0.0, 1, -100, True)
    return call


def fwd_bwd(loss_fn, s, t):
    def call():
        loss = loss_fn(s, t)
        (grad,) = torch.autograd.grad(loss, s)
        return grad
    return call


def graph_times_from_hbm(loss_fn, s, t, device, repeats):
    """GPU seconds per fwd+bwd call from a CUDA graph replay, with inputs that come from HBM.

    A graph replayed on the same tensors re-reads them from L2 when they fit there (50 MB on an
    H100/H200; (16, 131072) fp32 is 24 MiB of student, teacher and gradient), which would measure
    L2 bandwidth against the HBM memcpy roofline. So the graph holds one call on each of ``copies``
    distinct input pairs, together three times the L2 size, and the time is divided by
    ``copies``. Problems with C < 1000 (judged on latency, not bandwidth) keep one copy.
    Returns (seconds per call samples, copies)."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    working = 3 * s.numel() * s.element_size()
    # Small-C problems are judged on latency (a training step's logits were just written, so they
    # sit in L2): one copy. The bandwidth-judged ones get enough copies to leave L2 (at most 64).
    copies = 1 if s.shape[1] < 1000 else max(1, min(64, math.ceil(3 * l2 / working)))
    calls = [fwd_bwd(loss_fn, s, t)] + [fwd_bwd(loss_fn, s.detach().clone().requires_grad_(True), t.clone())
                                         for _ in range(copies - 1)]

    def every_copy():
        for call in calls:
            call()
    samples = C.cuda_graph_times(every_copy, device, repeats=repeats, replays=max(2, 20 // copies))
    return [x / copies for x in samples], copies


def bench_case(B, Cn, dtype_name, device, args, memcpy_gbps, gen):
    import kdseq_fast as kf

    dtype = C.DTYPES[dtype_name]

    # Logit scale ~3 gives peaked but not one-hot softmaxes, like a trained classifier's.
    s = (torch.randn(B, Cn, generator=gen) * 3).to(device=device, dtype=dtype).requires_grad_(True)
    t = (torch.randn(B, Cn, generator=gen) * 3).to(device=device, dtype=dtype)
    calls, compile_s, errors = {}, None, {}
    # kdseq's candidates and their planner specs ("": the planner as it is).
    plan_specs = {**({"kdseq": ""} if "kdseq" in args.candidates else {}),
                  **{f"kdseq[{spec}]": spec for spec in args.plans}}
    kdseq_fns = {name: (lambda a, b: kf.kd_loss(a, b, temperature=TEMPERATURE)) if not spec else planned_kd(spec)
                 for name, spec in plan_specs.items()}
    for name, fn in kdseq_fns.items():
        calls[name] = fwd_bwd(fn, s, t)
    if "eager" in args.candidates:
        calls["eager"] = fwd_bwd(eager_kd, s, t)
    if "compile" in args.candidates:
        try:
            # A fresh dynamo state per case: one static-shape graph each, no recompile-limit hits.
            torch._dynamo.reset()
            compiled = torch.compile(eager_kd, dynamic=False)
            call = fwd_bwd(compiled, s, t)
            C.sync(device)
            t0 = time.perf_counter()
            call()
            C.sync(device)
            compile_s = time.perf_counter() - t0
            calls["compile"] = call
        except Exception as exc:  # a missing C++ toolchain must not sink the other candidates
            errors["compile"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    if "liger" in args.candidates and device.type == "cuda":
        fn = liger_loss_fn()
        if fn is not None:
            calls["liger"] = fwd_bwd(fn, s, t)

    # Sanity: a fast wrong kernel is worthless, so each gradient is checked against fp64.
    s64 = s.detach().double().requires_grad_(True)
    (ref_grad,) = torch.autograd.grad(kf.kd_loss_reference(s64, t, temperature=TEMPERATURE), s64)
    max_err = {}
    for name, call in calls.items():
        try:
            g = call()
            max_err[name] = float((g.double() - ref_grad).abs().max())
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
    for name in errors:
        calls.pop(name, None)
    del ref_grad, s64

    times = C.interleaved_times(calls, device=device, repeats=args.repeats, warmup=args.warmup,
                                desc=f"{B}x{Cn} {dtype_name}")
    gpu_s, graph_s, graph_copies, kernel_s, layout, host_syncs = {}, {}, {}, {}, {}, {}
    if device.type == "cuda":
        for name, call in calls.items():
            gpu_s[name] = C.summarize(C.cuda_event_times(call, device, repeats=args.repeats))["median_s"]
            if not name.startswith("kdseq"):
                continue  # the peers' targets use their wall time; their graph replays took minutes
            # Whether one fwd+bwd call waits for the GPU: torch raises on any synchronizing
            # call under this mode (the issue-14 target; graph capture would fail too).
            C.sync(device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                call()
                host_syncs[name] = 0
            except RuntimeError as exc:
                host_syncs[name] = 1
                errors[f"{name} (host sync)"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            finally:
                torch.cuda.set_sync_debug_mode(0)
            try:
                samples, graph_copies[name] = graph_times_from_hbm(kdseq_fns[name], s, t, device, args.repeats)
                graph_s[name] = C.summarize(samples)["median_s"]
            except Exception as exc:  # a candidate that cannot be captured still has its other times
                errors[f"{name} (graph replay)"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
                if host_syncs[name] == 0:
                    # set_sync_debug_mode sees only torch's synchronizations; a capture that fails
                    # may be one it missed, so "no host sync" is not established.
                    host_syncs[name] = None
        for name, spec in plan_specs.items():
            if name not in calls:
                continue
            kernel_s[name] = C.summarize(C.cuda_event_times(kdseq_op_call(s, t, spec), device,
                                                            repeats=args.repeats))["median_s"]
            # The kernel layout the planner chose (a cluster the device refuses runs the split path).
            layout[name] = torch.ops.kdseq._last_plan()
    roofline_bytes = 3 * B * Cn * s.element_size()
    rows = []
    eager_med = C.summarize(times["eager"])["median_s"] if "eager" in times else None
    for name, samples in times.items():
        st = C.summarize(samples)
        gbps = roofline_bytes / st["median_s"] / 1e9
        graph_gbps = roofline_bytes / graph_s[name] / 1e9 if name in graph_s else None
        rows.append({
            "dtype": dtype_name, "B": B, "C": Cn, "candidate": name, **st,
            "GBps": gbps, "roofline_fraction": gbps / memcpy_gbps,
            "roofline_bytes": roofline_bytes,
            "speedup_vs_eager": (eager_med / st["median_s"]) if eager_med else None,
            "peak_extra_bytes": None if args.no_memory else C.peak_extra_memory(calls[name], device),
            "max_abs_grad_err_vs_fp64": max_err.get(name),
            "compile_time_s": compile_s if name == "compile" else None,
            "gpu_s": gpu_s.get(name),
            "graph_s": graph_s.get(name),
            "graph_GBps": graph_gbps,
            "graph_roofline_fraction": None if graph_gbps is None else graph_gbps / memcpy_gbps,
            "graph_input_copies": graph_copies.get(name),
            "kernel_s": kernel_s.get(name),
            "layout": layout.get(name),
            "host_syncs": host_syncs.get(name),
        })
    return rows, errors


def evaluate_targets(rows, device, required=()):
    """PASS/MISS/NOT RUN lines. ``required``: (dtype, B, C) cases whose targets must be judged on
    CUDA; one without a plain ``kdseq`` row (not run, or kdseq failed there) prints NOT RUN, so a
    partial run cannot read as the issue's "every shape"."""
    def med(dtype, B, Cn, cand):
        for r in rows:
            if (r["dtype"], r["B"], r["C"], r["candidate"]) == (dtype, B, Cn, cand):
                return r["median_s"]
        return None

    def ratio(a, b):
        return None if a is None or b is None else a / b

    targets = []
    if device.type == "cpu":
        k = med("fp32", 512, 32000, "kdseq")
        targets.append(C.target("fp32 (512, 32000): kdseq speed-up vs eager",
                                ratio(med("fp32", 512, 32000, "eager"), k), 5.0, unit="x"))
        targets.append(C.target("fp32 (512, 32000): kdseq speed-up vs torch.compile",
                                ratio(med("fp32", 512, 32000, "compile"), k), 2.0, unit="x"))
        targets.append(C.target("fp32 (256, 1000): kdseq speed-up vs eager",
                                ratio(med("fp32", 256, 1000, "eager"), med("fp32", 256, 1000, "kdseq")),
                                3.0, unit="x"))
        roofline_rows = [r for r in rows if r["candidate"] == "kdseq" and r["dtype"] == "fp32" and r["C"] >= 32000]
        for r in roofline_rows:
            targets.append(C.target(f"fp32 ({r['B']}, {r['C']}): kdseq time / memcpy-roofline time",
                                    1.0 / r["roofline_fraction"], 3.0, higher_is_better=False, unit="x"))
        if not roofline_rows:  # reported as NOT RUN, not left out
            targets.append(C.target("fp32 C >= 32000: kdseq time / memcpy-roofline time", None, 3.0,
                                    higher_is_better=False, unit="x"))
    else:
        # Issue 14's targets, each measured in this run (for kdseq and for each --plans variant).
        for r in rows:
            if not r["candidate"].startswith("kdseq"):
                continue
            key = (r["dtype"], r["B"], r["C"])
            # The default candidate keeps the target names of earlier runs; a variant says which it is.
            who = "" if r["candidate"] == "kdseq" else f" {r['candidate']}"
            if r["C"] >= 4096 and r["B"] * r["C"] >= 2**25:
                targets.append(C.target(f"{key[0]} ({key[1]}, {key[2]}){who}: fwd+bwd fraction of the measured "
                                        "memcpy (HBM) bandwidth", r["roofline_fraction"], 0.85))
            # Small problems: the GPU's own time (graph replay), when the call could be captured;
            # the host's launch overhead is reported beside it in the table.
            if (r["B"], r["C"]) == (16, 131072):
                graphed = r["graph_roofline_fraction"] is not None
                targets.append(C.target(f"{key[0]} (16, 131072){who}: fwd+bwd fraction of memcpy (split rows"
                                        + (", GPU time of a graph replay)" if graphed else ", wall time)"),
                                        r["graph_roofline_fraction"] if graphed else r["roofline_fraction"], 0.5))
            if (r["B"], r["C"]) == (256, 100):
                targets.append(C.target(f"{key[0]} (256, 100){who}: host synchronizations in one fwd+bwd call "
                                        "(torch.cuda.set_sync_debug_mode('error'))", r["host_syncs"], 0.0,
                                        higher_is_better=False))
                gpu = r["graph_s"] if r["graph_s"] is not None else r["gpu_s"]
                targets.append(C.target(f"{key[0]} (256, 100){who}: fwd+bwd GPU time ("
                                        + ("graph replay" if r["graph_s"] is not None else "events around the call")
                                        + ")", gpu * 1e6 if gpu is not None else None, 30.0,
                                        higher_is_better=False, unit=" us"))
            if r["C"] >= 1000:
                targets.append(C.target(f"{key[0]} ({key[1]}, {key[2]}): {r['candidate']} speed-up vs torch.compile",
                                        ratio(med(*key, "compile"), r["median_s"]), 1.5, unit="x"))
                targets.append(C.target(f"{key[0]} ({key[1]}, {key[2]}): {r['candidate']} speed-up vs Liger",
                                        ratio(med(*key, "liger"), r["median_s"]), 3.0, unit="x"))
        measured = {(r["dtype"], r["B"], r["C"]) for r in rows if r["candidate"] == "kdseq"}
        for dtype, B, Cn in required:
            if (dtype, B, Cn) not in measured:
                targets.append(C.target(f"{dtype} ({B}, {Cn}): every issue-14 target of this case "
                                        "(kdseq not measured in this run)", None, None))
    return targets


# The (dtype, B, C) cases issue 14's CUDA targets are judged on, fp32 and bf16: every CUDA shape
# with C >= 1000 (speed-ups; with B*C >= 2^25 also bandwidth) and (256, 100) (GPU time, no sync).
REQUIRED_CUDA_CASES = [(d, B, Cn) for d in ("fp32", "bf16") for B, Cn in CUDA_SHAPES
                       if Cn >= 1000 or (B, Cn) == (256, 100)]


def build_parser() -> argparse.ArgumentParser:
    """The command line (also parsed by tests/test_check_gpu.py, which checks the prepared GPU
    call's arguments without a GPU)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.add_common_args(ap)
    ap.add_argument("--shapes", nargs="+", type=C.parse_shape, default=None,
                    help="B x C cases, e.g. 512x32000 (default: the issue's 7 shapes, 11 on CUDA, 2 with --quick)")
    ap.add_argument("--candidates", nargs="+", default=list(CANDIDATES), choices=CANDIDATES)
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--plans", nargs="+", default=[], metavar="SPEC",
                    help="CUDA: also time kdseq with the kernel planner adjusted by each "
                         "torch.ops.kdseq._force_plan spec, e.g. prefer=staged prefer=twopass")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.quick else 15
    if args.warmup is None:
        args.warmup = 1 if args.quick else 3
    if args.repeats < 1 or args.warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats}, {args.warmup}")
    device = C.resolve_device(args.device)
    if args.plans and device.type != "cuda":
        ap.error("--plans adjusts the CUDA kernel planner: it needs --device cuda")
    for spec in args.plans:
        try:
            with C.forced_plan(spec):  # a bad spec fails here, before any timing
                pass
        except RuntimeError as exc:
            ap.error(f"--plans {spec!r}: {exc}".splitlines()[0])
    shapes = args.shapes or (QUICK_SHAPES if args.quick else CUDA_SHAPES if device.type == "cuda" else SHAPES)
    C.apply_threads(args.threads)

    info = C.machine_info(device)
    C.print_header("bench_kd_loss: fused KD loss forward+backward", info)
    # Well beyond the last-level cache (tens of MiB on a CPU, 50 MiB L2 on an H100).
    memcpy_bytes = (32 if args.quick else 256) * 2**20 * (4 if device.type == "cuda" else 1)
    mem_before = C.memcpy_bandwidth(device, nbytes=memcpy_bytes)
    print(f"memcpy bandwidth (read+write, {C.fmt_bytes(memcpy_bytes)} buffer): {mem_before['GBps']:.1f} GB/s")
    if device.type == "cuda" and "liger" in args.candidates and liger_loss_fn() is None:
        print("liger: Liger-Kernel not installed, peer skipped")

    gen = torch.Generator().manual_seed(args.seed)
    rows, errors = [], {}
    for dtype_name in args.dtypes:
        for B, Cn in shapes:
            case_rows, case_errors = bench_case(B, Cn, dtype_name, device, args,
                                                mem_before["GBps"], gen)
            rows += case_rows
            for name, msg in case_errors.items():
                errors[f"{dtype_name} {B}x{Cn} {name}"] = msg
                print(f"  {dtype_name} {B}x{Cn} {name}: skipped ({msg})")
            for r in case_rows:
                gpu = "" if r["gpu_s"] is None else f"  GPU {C.fmt_time(r['gpu_s'])}"
                if r["graph_s"] is not None:
                    gpu += f"  graph replay {C.fmt_time(r['graph_s'])}"
                kernel = "" if r["kernel_s"] is None else f"  kernel-only {C.fmt_time(r['kernel_s'])}"
                kernel += "" if r["layout"] is None else f"  layout {r['layout']}"
                print(f"  {dtype_name} {B:>5}x{Cn:<6} {r['candidate']:8s} {C.fmt_time(r['median_s']):>9} "
                      f"{r['GBps']:7.2f} GB/s  x{r['speedup_vs_eager'] or float('nan'):.2f} vs eager{gpu}{kernel}")
            if device.type == "cuda":
                # Now, not only at the end: a run stopped by a time limit keeps the verdicts so far.
                for line in C.format_targets(evaluate_targets(case_rows, device)):
                    print(f"  target {line}", flush=True)
    mem_after = C.memcpy_bandwidth(device, nbytes=memcpy_bytes)
    print(f"memcpy bandwidth at the end: {mem_after['GBps']:.1f} GB/s "
          "(fractions use the value measured at the start)")

    targets = evaluate_targets(rows, device, REQUIRED_CUDA_CASES if device.type == "cuda" else ())
    headers = ["dtype", "B", "C", "candidate", "median", "IQR", "GB/s", "of memcpy", "x eager",
               "peak extra mem", "max |grad err|"]
    if device.type == "cuda":
        headers += ["GPU time", "graph replay", "graph of memcpy", "kernel only", "layout"]
    table = C.markdown_table(headers, [
        [r["dtype"], r["B"], r["C"], r["candidate"], C.fmt_time(r["median_s"]), C.fmt_time(r["iqr_s"]),
         f"{r['GBps']:.2f}", f"{100 * r['roofline_fraction']:.1f}%",
         None if r["speedup_vs_eager"] is None else f"{r['speedup_vs_eager']:.2f}",
         C.fmt_bytes(r["peak_extra_bytes"]),
         None if r["max_abs_grad_err_vs_fp64"] is None else f"{r['max_abs_grad_err_vs_fp64']:.1e}"]
        + ([C.fmt_time(r["gpu_s"]), C.fmt_time(r["graph_s"]),
            None if r["graph_roofline_fraction"] is None else f"{100 * r['graph_roofline_fraction']:.1f}%",
            C.fmt_time(r["kernel_s"]), r["layout"] and r["layout"].split(",prologue")[0]]
           if device.type == "cuda" else [])
        for r in rows])
    compile_lines = [f"- {r['dtype']} {r['B']}x{r['C']}: {r['compile_time_s']:.1f} s"
                     for r in rows if r["compile_time_s"] is not None]
    info["loadavg_end"] = C.load_average()
    md = "\n".join([
        "# bench_kd_loss", "", f"`{C.command_line()}`", "",
        f"Machine: {info['cpu_model']}, {info['cpu_cores']} cores ({info['torch_threads']} torch threads)"
        + (f", {info['gpu']}" if "gpu" in info else "")
        + f", torch {info['torch']}, load average {info['loadavg_start']} -> {info['loadavg_end']}; "
        f"kdseq build {info['kdseq_build']}", "",
        f"memcpy bandwidth (read+write): {mem_before['GBps']:.1f} GB/s at the start, "
        f"{mem_after['GBps']:.1f} GB/s at the end. Roofline bytes per call = 3*B*C*sizeof(dtype). "
        f"T = {TEMPERATURE}, {args.repeats} interleaved samples per candidate after {args.warmup} warm-up calls.",
        f"Peak extra memory: {C.PEAK_MEMORY_METHOD[device.type]}.", "",
        table, "",
        *(["torch.compile compile time (first fwd+bwd call, excluded above):", *compile_lines, ""]
          if compile_lines else []),
        *([f"Skipped: {k}: {v}" for k, v in errors.items()] + [""] if errors else []),
        "Targets:", "", *[f"- {line}" for line in C.format_targets(targets)],
    ])
    print()
    print(table)
    print()
    for line in compile_lines:
        print("compile time", line[2:])
    for line in C.format_targets(targets):
        print(line)
    payload = {"benchmark": "kd_loss", "command": C.command_line(), "machine": info,
               "temperature": TEMPERATURE, "repeats": args.repeats, "warmup": args.warmup,
               "memcpy": {"start": mem_before, "end": mem_after},
               "peak_memory_method": C.PEAK_MEMORY_METHOD[device.type],
               "rows": rows, "targets": targets, "errors": errors}
    for path in C.write_outputs(args.out, "bench_kd_loss", payload, md):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(C.script_main(main))
