"""Every CUDA kernel layout of the fused KD loss timed on the same problems: the measurements
behind the planner's choice (csrc/kd_loss_kernels.cuh, plan_kd_loss).

For each dtype, (B, C) and with/without the CE term, each layout is forced with
``torch.ops.kdseq._force_plan`` and timed as forward+backward on the GPU: one call captured in a
CUDA graph (the layout fixed at capture) and replayed ``--calls`` times between CUDA events, so the
time is the GPU's own, not the host's launch rate (a call that cannot be captured falls back to
events around ``--calls`` back-to-back calls; the ``timing`` field says which), reported per call
with the fraction of the copy bandwidth measured in the same run (bytes moved:
student and teacher read once, the gradient written once). The planner's own choice is the row
``plan=auto``; the fastest layout of each problem is marked. ``ran`` is the layout that actually ran
(``torch.ops.kdseq._last_plan``): a forced layout the device cannot launch falls back to the split
path, and is then reported as such.

    python benchmarks/bench_kd_plans.py --device cuda
    python benchmarks/bench_kd_plans.py --device cuda --shapes 4096x32000 --dtypes bf16 --out results
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import _common as C  # noqa: E402

BLOCK_THREADS = 256  # csrc/cuda_rows.cuh kBlockThreads
SHAPES = [(4096, 32000), (16384, 32000), (4096, 131072), (512, 32000), (16, 131072), (4096, 4096)]


def layouts(C_: int, with_ce: bool) -> list:
    """Plan strings whose register rows hold C_ values (plus the split path at several widths)."""
    emax = 16 if with_ce else 32
    out = [""]
    for e in (8, 16, 32):
        if e <= emax and BLOCK_THREADS * e >= C_ and (e == 8 or BLOCK_THREADS * e // 2 < C_):
            out.append(f"mode=cta,e={e}")
    for k in (2, 3, 4, 6, 8, 12, 16):
        for e in (8, 16, 32):
            if e <= emax and BLOCK_THREADS * e * k >= C_ and BLOCK_THREADS * e * k // 2 < C_ * 1.01:
                out.append(f"mode=cluster,cluster={k},e={e}")
    for seg in (1, 2, 4, 8, 16, 32):
        if C_ // seg >= 1024:
            out.append(f"mode=split,segments={seg}")
    out.append("mode=twopass")  # statistics and gradient of a row in one CTA (L2 re-read)
    # Row slices staged in shared memory (one HBM read): slices of 1K+ columns that fit an fp32
    # student and teacher in ~200 KiB (16-bit rows need half); unaligned rows run the split path.
    for k in (1, 2, 4, 8, 16):
        per = -(-C_ // k)
        if per * 8 <= 200 * 1024 and (k == 1 or per >= 1024):
            out.append(f"mode=staged,cluster={k}")
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line (also parsed by tests/test_check_gpu.py, which checks the prepared GPU
    call's arguments without a GPU)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", choices=("cuda",))
    ap.add_argument("--shapes", nargs="+", type=C.parse_shape, default=SHAPES)
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=sorted(C.DTYPES))
    ap.add_argument("--calls", type=int, default=20, help="back-to-back calls per timing")
    ap.add_argument("--repeats", type=int, default=3, help="timings per layout (median reported)")
    ap.add_argument("--ce", choices=("both", "on", "off"), default="both", help="the CE term (labels)")
    ap.add_argument("--out", default=None, help="directory for bench_kd_plans.json / .md")
    return ap


def main(argv=None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kd_plans: needs a CUDA GPU", file=sys.stderr)
        return 2
    import kdseq_fast as kf

    device = torch.device("cuda")
    info = C.machine_info(device)
    C.print_header("bench_kd_plans: every KD-loss kernel layout, forward+backward", info)
    mem = C.memcpy_bandwidth(device, nbytes=1 << 30)
    print(f"memcpy bandwidth (read+write, 1 GiB): {mem['GBps']:.1f} GB/s")
    gen = torch.Generator().manual_seed(0)
    rows = []
    ce_modes = {"both": (False, True), "on": (True,), "off": (False,)}[args.ce]
    for dtype_name in args.dtypes:
        dtype = C.DTYPES[dtype_name]
        for B, Cn in args.shapes:
            s = (torch.randn(B, Cn, generator=gen) * 3).to(device, dtype).requires_grad_(True)
            t = (torch.randn(B, Cn, generator=gen) * 3).to(device, dtype)
            y = torch.randint(0, Cn, (B,), generator=gen).to(device)
            nbytes = 3 * B * Cn * s.element_size()
            for with_ce in ce_modes:
                def call(s=s, t=t, y=y if with_ce else None, ce_weight=0.1 if with_ce else 0.0):
                    torch.autograd.grad(kf.kd_loss(s, t, y, ce_weight=ce_weight, validate=False), s)
                case = []
                for plan in layouts(Cn, with_ce):
                    try:
                        with C.forced_plan(plan):
                            call()
                            ran_plan = torch.ops.kdseq._last_plan()
                            ran = ran_plan.split(",")[0]
                            torch.cuda.synchronize()
                            # The GPU's own time: the call captured in a CUDA graph (with the plan
                            # fixed at capture) and replayed. Events around eager calls would time
                            # the host's launch rate at small sizes (~150 us of Python and autograd
                            # a call against ~60 us of kernels at (16, 131072)).
                            try:
                                times = C.cuda_graph_times(call, device, repeats=args.repeats,
                                                           replays=args.calls)
                                timing = "graph"
                            except RuntimeError:  # not capturable: events around back-to-back calls
                                times = C.cuda_event_times(call, device, repeats=args.repeats, warmup=0,
                                                           calls=args.calls)
                                timing = "events"
                    except RuntimeError as exc:
                        print(f"  {dtype_name} {B}x{Cn} ce={with_ce} {plan or 'auto'}: skipped ({exc})")
                        continue
                    sec = sorted(times)[len(times) // 2]
                    case.append({"dtype": dtype_name, "B": B, "C": Cn, "ce": with_ce, "plan": plan or "auto",
                                 "ran": ran, "ran_plan": ran_plan, "timing": timing,
                                 "us": sec * 1e6, "GBps": nbytes / sec / 1e9,
                                 "of_memcpy": nbytes / sec / 1e9 / mem["GBps"]})
                best = min(case, key=lambda r: r["us"]) if case else None
                for r in case:
                    r["best"] = r is best
                    print(f"  {dtype_name} {B:>5}x{Cn:<6} ce={int(with_ce)} {r['plan']:32s} ran={r['ran']:8s} "
                          f"{r['us']:9.1f} us ({r['timing']}) "
                          f"{r['GBps']:8.1f} GB/s {100 * r['of_memcpy']:5.1f}%{'  <- fastest' if r['best'] else ''}")
                rows += case
            del s, t, y, call  # call's defaults hold the tensors too
    table = C.markdown_table(["dtype", "B", "C", "CE", "plan", "ran", "fwd+bwd", "GB/s", "of memcpy", "fastest"],
                             [[r["dtype"], r["B"], r["C"], "yes" if r["ce"] else "no", r["plan"], r["ran"],
                               f"{r['us']:.1f} us" + ("" if r["timing"] == "graph" else " (events)"),
                               f"{r['GBps']:.0f}", f"{100 * r['of_memcpy']:.1f}%", "*" if r["best"] else ""]
                              for r in rows])
    print()
    print(table)
    print(f"command: {C.command_line()}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "bench_kd_plans.json"), "w") as fh:
            json.dump({"machine": info, "memcpy_GBps": mem["GBps"], "rows": rows}, fh, indent=1)
        with open(os.path.join(args.out, "bench_kd_plans.md"), "w") as fh:
            fh.write(f"command: `{C.command_line()}`\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(C.script_main(main))
