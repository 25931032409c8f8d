"""Small helpers shared by the scripts in ``benchmarks/``: timing, memcpy roofline, peak memory,
machine description, PASS/MISS targets and JSON + markdown output.

Nothing here knows about a particular op; each benchmark builds its own candidates (zero-argument
callables) and hands them to :func:`interleaved_times`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# command line and machine
# ---------------------------------------------------------------------------------------------
def script_main(main: Callable[[], int], *, on_preempt: str = "", preempt_rc: int = 0,
                run_dir_hint: str = "") -> int:
    """A benchmark script's ``main()`` with the exits of the ``kdseq-fast`` CLI: a mistake in its
    input (a bad value, a missing file, an unusable --out, no GPU for --device cuda) is one
    ``error:`` line and exit 2, not a traceback; a run that diverged is one line and exit 3. A
    SIGTERM/SIGINT the trainer honoured prints ``on_preempt`` (what this script does next; the
    CLI's "--resume" advice is not for it) and returns ``preempt_rc``; ``run_dir_hint`` follows a
    refused run directory's message for the same reason (its "--overwrite")."""
    from kdseq_fast._extension import CudaKernelsUnavailable
    from kdseq_fast.run_dir import RunDirError
    from kdseq_fast.runtime import CheckpointError
    from kdseq_fast.trainer import NonFiniteError, Preempted

    prog = os.path.basename(sys.argv[0])
    try:
        return main()
    except Preempted as exc:
        print(f"{prog}: {str(exc).split('; ')[0]}. {on_preempt}".rstrip(), flush=True)
        return preempt_rc
    except NonFiniteError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr, flush=True)
        return 3
    except (ValueError, TypeError, OSError, CheckpointError, CudaKernelsUnavailable) as exc:
        hint = f" ({run_dir_hint})" if run_dir_hint and isinstance(exc, RunDirError) else ""
        print(f"{prog}: error: {exc}{hint}", file=sys.stderr, flush=True)
        return 2


def add_common_args(ap: argparse.ArgumentParser, *, default_dtypes=("fp32", "bf16"),
                    default_repeats: int = 15) -> None:
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                    help="auto = cuda when available, else cpu")
    ap.add_argument("--quick", action="store_true", help="few small shapes and repetitions (smoke run)")
    ap.add_argument("--out", default=None, help="directory for the JSON and markdown results")
    ap.add_argument("--dtypes", nargs="+", default=list(default_dtypes), choices=sorted(DTYPES))
    ap.add_argument("--repeats", type=int, default=None,
                    help=f"timed samples per candidate (default {default_repeats}, 3 with --quick)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per candidate first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads for the run (default: torch's choice, one per core)")


def apply_threads(threads: Optional[int]) -> None:
    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but torch.cuda.is_available() is False")
    return torch.device(name)


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in sys.argv)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> Optional[List[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(device: torch.device) -> dict:
    """Everything a reader needs to judge the numbers: CPU, cores, threads, torch, build, load."""
    info = {
        "cpu_model": _cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "loadavg_start": load_average(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    try:
        import kdseq_fast
        info["kdseq_build"] = kdseq_fast.build_info()
    except Exception as exc:  # the table is still useful without it; say why it is missing
        info["kdseq_build"] = f"unavailable: {exc}"
    return info


def print_header(title: str, info: dict) -> None:
    print(f"# {title}")
    print(f"command: {command_line()}")
    print(f"cpu: {info['cpu_model']} ({info['cpu_cores']} cores, torch threads {info['torch_threads']}), "
          f"load average {info['loadavg_start']}")
    if "gpu" in info:
        print(f"gpu: {info['gpu']} ({info['gpu_memory_gib']} GiB), cuda {info['cuda']}")
    print(f"torch {info['torch']}, python {info['python']}, kdseq build {info['kdseq_build']}")


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _calibrate_inner(fn: Callable[[], object], device: torch.device, min_sample_s: float) -> int:
    """Calls per sample so that one sample lasts at least ``min_sample_s``.

    Microsecond-scale calls are dominated by timer resolution and launch jitter when timed one by
    one; batching them into one sample and dividing keeps the per-call median meaningful.
    """
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    one = max(time.perf_counter() - t0, 1e-7)
    return max(1, min(10_000, math.ceil(min_sample_s / one)))


def interleaved_times(candidates: Dict[str, Callable[[], object]], *, device: torch.device,
                      repeats: int, warmup: int, min_sample_s: float = 2e-3,
                      desc: str = "timing") -> Dict[str, List[float]]:
    """Seconds per call for every candidate, sampled round-robin.

    Each round runs one sample of every candidate (in a rotating order), so load drift on a
    shared machine hits all candidates alike instead of whichever happened to run last.
    Warm-up calls are untimed.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    names = list(candidates)
    for name in names:
        for _ in range(max(warmup, 0)):
            candidates[name]()
    sync(device)
    inner = {n: _calibrate_inner(candidates[n], device, min_sample_s) for n in names}
    times: Dict[str, List[float]] = {n: [] for n in names}
    for r in tqdm(range(repeats), desc=desc, leave=False, disable=None):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn, k = candidates[name], inner[name]
            sync(device)
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) / k)
    return times


def cuda_event_times(fn: Callable[[], object], device: torch.device, *, repeats: int,
                     warmup: int = 2, calls: int = 1) -> List[float]:
    """GPU seconds per call: CUDA events recorded on the stream before and after ``calls``
    back-to-back calls a sample, so the time is what the GPU spent from the first to the last
    kernel (host time between launches shows up only as GPU idle time inside the window)."""
    for _ in range(max(warmup, 0)):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3 / calls)
    return out


def cuda_graph_times(fn: Callable[[], object], device: torch.device, *, repeats: int,
                     replays: int = 20) -> List[float]:
    """GPU seconds per call with the host out of the picture: ``fn`` is captured once in a CUDA
    graph (after warm-up calls on a side stream, as capture requires) and the graph is replayed
    ``replays`` times between two events per sample. What remains is the GPU's own time: its
    kernels and the gaps between them, none of Python's, the dispatcher's or autograd's launch
    work. Raises when ``fn`` cannot be captured (e.g. it synchronizes)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    sync(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    sync(device)
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3 / replays)
    del graph
    return out


def summarize(samples: Sequence[float]) -> dict:
    """Median and inter-quartile range (seconds) of a list of samples."""
    xs = sorted(samples)
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median_s": statistics.median(xs), "q1_s": q1, "q3_s": q3, "iqr_s": q3 - q1, "n": len(xs)}


# ---------------------------------------------------------------------------------------------
# bandwidth roofline
# ---------------------------------------------------------------------------------------------
def memcpy_bandwidth(device: torch.device, *, nbytes: int = 256 * 2**20, repeats: int = 10) -> dict:
    """Device-to-same-device copy bandwidth, counting bytes read + bytes written.

    The buffer is large enough to spill every CPU cache, so this is the DRAM (or HBM) bandwidth a
    streaming kernel can hope for with torch's own multi-threaded copy. The median of ``repeats``
    samples is reported, each sample timed like the candidates it is compared with (copies back to
    back for at least 2 ms): one copy a sample would count a launch and a synchronization per copy,
    understating the bandwidth and so overstating every "fraction of memcpy".
    """
    n = max(nbytes // 4, 1)
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults must not count as bandwidth
    times = interleaved_times({"copy": lambda: dst.copy_(src)}, device=device, repeats=repeats,
                              warmup=1, desc="memcpy")["copy"]
    st = summarize(times)
    moved = 2 * src.numel() * src.element_size()
    return {"bytes_copied": src.numel() * src.element_size(), "bytes_moved_per_copy": moved,
            "median_s": st["median_s"], "GBps": moved / st["median_s"] / 1e9,
            "GBps_q1_q3": [moved / st["q3_s"] / 1e9, moved / st["q1_s"] / 1e9]}


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------
PEAK_MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated() during one call minus memory_allocated() before it",
    "cpu": ("running sum of the CPU allocator's allocation/free events recorded by torch.profiler "
            "(profile_memory=True) during one call; its maximum. Counts every tensor the call "
            "allocates, outputs kept afterwards included; inputs that existed before do not count"),
}


def _cpu_peak_extra_bytes(fn: Callable[[], object]) -> Optional[int]:
    # Kineto logs every profiler start/stop at its default level; keep the benchmark output readable.
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    kineto = getattr(prof.profiler, "kineto_results", None)
    if kineto is None:
        return None
    records = sorted((e.start_ns(), e.nbytes()) for e in kineto.events()
                     if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    current = peak = 0
    for _, nb in records:
        current += nb
        peak = max(peak, current)
    return peak


def peak_extra_memory(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated on ``device`` by one call of ``fn`` beyond what was allocated before.

    See ``PEAK_MEMORY_METHOD`` for how each device measures it. None when the profiler does not
    expose allocation events in this torch version (never a guess).
    """
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()  # the peak is recorded while fn runs (its result included)
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    return _cpu_peak_extra_bytes(fn)


@contextmanager
def forced_plan(spec: str):
    """The CUDA KD-loss kernel planner adjusted by ``torch.ops.kdseq._force_plan(spec)`` on this
    thread for the block ("" leaves the planner alone); always restored afterwards. A bad spec
    raises RuntimeError on entry."""
    import kdseq_fast  # noqa: F401  (registers torch.ops.kdseq)

    torch.ops.kdseq._force_plan(spec)
    try:
        yield
    finally:
        torch.ops.kdseq._force_plan("")


# ---------------------------------------------------------------------------------------------
# targets and output
# ---------------------------------------------------------------------------------------------
def parse_shape(text: str) -> tuple:
    """``--shapes`` entries: ``BxC`` (or ``B,C``) with B >= 1 rows and C >= 2 classes."""
    try:
        b, c = (int(x) for x in text.lower().replace(",", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shapes entries look like 4096x32000, got {text!r}") from None
    if b < 1 or c < 2:
        raise argparse.ArgumentTypeError(f"--shapes needs B >= 1 and C >= 2, got {text!r}")
    return b, c


def target(description: str, measured: Optional[float], threshold: Optional[float], *,
           higher_is_better: bool = True, unit: str = "") -> dict:
    """One PASS/MISS line from a measured value; ``measured`` None means the case was not run
    (``threshold`` None: a case standing for several targets, all of them NOT RUN)."""
    if measured is None or (isinstance(measured, float) and math.isnan(measured)):
        status = "NOT RUN"
    elif higher_is_better:
        status = "PASS" if measured >= threshold else "MISS"
    else:
        status = "PASS" if measured <= threshold else "MISS"
    return {"target": description, "measured": measured, "threshold": threshold,
            "higher_is_better": higher_is_better, "unit": unit, "status": status}


def format_targets(targets: List[dict]) -> List[str]:
    lines = []
    for t in targets:
        if t["threshold"] is None:
            lines.append(f"{t['status']:7s} {t['target']}")
            continue
        m = "-" if t["measured"] is None else f"{t['measured']:.3g}{t['unit']}"
        op = ">=" if t["higher_is_better"] else "<="
        lines.append(f"{t['status']:7s} {t['target']}: measured {m} (target {op} {t['threshold']:g}{t['unit']})")
    return lines


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    def cell(x):
        if x is None:
            return "-"
        if isinstance(x, float):
            return f"{x:.3g}"
        return str(x)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt_time(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def fmt_bytes(n: Optional[int]) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


def write_outputs(out_dir: Optional[str], name: str, payload: dict, markdown: str) -> List[str]:
    """Writes ``<name>.json`` and ``<name>.md`` into ``out_dir`` (created); returns the paths."""
    if not out_dir:
        return []
    os.makedirs(out_dir, exist_ok=True)
    paths = [os.path.join(out_dir, f"{name}.json"), os.path.join(out_dir, f"{name}.md")]
    with open(paths[0], "w") as fh:
        json.dump(payload, fh, indent=1, default=str)
    with open(paths[1], "w") as fh:
        fh.write(markdown.rstrip() + "\n")
    return paths
