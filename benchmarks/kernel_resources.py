"""Registers, spills and shared memory of every CUDA kernel, as ptxas reports them: the one
performance signal of the CUDA code that needs no GPU.

Compiles ``csrc/kd_loss_cuda.cu`` and ``csrc/instance_scores_cuda.cu`` for one architecture (device
code only, ``nvcc -cubin``) with the optimization flags of the extension's build (``setup.py``:
``-O3 --expt-relaxed-constexpr -DKDSEQ_WITH_CUDA``, plus torch's ``COMMON_NVCC_FLAGS``) and
``-Xptxas -v``, and prints a row per kernel instantiation: registers per thread, stack frame, spill
stores and loads (bytes per thread), static shared memory. Instantiations that the planner never
dispatches (e.g. 8-lane rows at 32 elements a thread, which only a forced plan reaches) are compiled too and listed like the others.

A spill is not a verdict: the register-rows kernels at 32 elements a thread spill 44-220 bytes (sm_90) of
row bookkeeping and were still the fastest register layouts on an H200 (benchmarks/README.md).
The table tells a kernel change that adds spills or registers before any GPU run does.

    python benchmarks/kernel_resources.py                    # sm_90, both sources
    python benchmarks/kernel_resources.py --arch 80 --out results/
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import site
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as C  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("csrc/kd_loss_cuda.cu", "csrc/instance_scores_cuda.cu")
# setup.py make_extension's nvcc flags that change code generation (-lineinfo does not).
BUILD_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-DKDSEQ_WITH_CUDA"]

_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")  # absent when a kernel has no static shared memory


def find_nvcc() -> Optional[str]:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    path = os.path.join(home, "bin", "nvcc")
    return path if os.path.exists(path) else shutil.which("nvcc")


def include_flags(nvcc: str) -> List[str]:
    """torch's headers, and the pip CUDA wheels' headers when the toolkit lacks cuSPARSE's: the
    search of setup.py's cuda_fallback_includes (setup.py runs setup() on import, so it is not
    importable from here)."""
    from torch.utils import cpp_extension

    try:
        paths = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch < 2.6 spells it cuda=True
        paths = cpp_extension.include_paths(cuda=True)
    flags = ["-I" + os.path.join(ROOT, "csrc")] + ["-I" + p for p in paths]
    toolkit_inc = os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include")
    if not os.path.exists(os.path.join(toolkit_inc, "cusparse.h")):
        for root in site.getsitepackages():
            for inc in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
                if os.path.exists(os.path.join(inc, "cusparse.h")):
                    flags += ["-isystem", inc]
    return flags


def demangle(names: List[str]) -> Dict[str, str]:
    tool = shutil.which("c++filt")
    if not tool or not names:
        return {n: n for n in names}
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short_name(demangled: str) -> str:
    """``void kdseq::kd_kernels::kd_rows_kernel<float, 256, 32, false, true>(...)`` ->
    ``kd_rows_kernel<float, 256, 32, false, true>``."""
    name = demangled.split("(", 1)[0]
    name = re.sub(r"^void\s+", "", name)
    return re.sub(r"^(?:\w+::)+", "", name)


def parse_ptxas(log: str) -> List[dict]:
    """One record per entry function from ``-Xptxas -v`` output."""
    rows, cur = [], None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2), "stack": 0, "spill_stores": 0,
                   "spill_loads": 0}
            continue
        if cur is None:
            continue
        m = _STACK.search(line)
        if m:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
            continue
        m = _USED.search(line)
        if m:
            smem = _SMEM.search(line)
            cur.update(registers=int(m.group(1)), smem=int(smem.group(1)) if smem else 0)
            rows.append(cur)
            cur = None
    entries = len(_ENTRY.findall(log))
    if len(rows) != entries:  # a format change must not drop kernels from the table silently
        raise RuntimeError(f"parsed {len(rows)} of the {entries} kernels in ptxas's report")
    names = demangle([r["mangled"] for r in rows])
    for r in rows:
        r["kernel"] = short_name(names[r["mangled"]])
    return rows


def compile_source(nvcc: str, source: str, arch: str, extra: List[str]) -> List[dict]:
    from torch.utils import cpp_extension

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", "-std=c++20", *BUILD_FLAGS,
               *cpp_extension.COMMON_NVCC_FLAGS, *extra, "-Xptxas", "-v",
               "-o", os.path.join(tmp, "out.cubin"), os.path.join(ROOT, source)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed on {source} (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    rows = parse_ptxas(proc.stderr)
    for r in rows:
        r["source"] = source
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="90", help="compute capability without the dot (default 90)")
    ap.add_argument("--sources", nargs="+", default=list(SOURCES), choices=SOURCES)
    ap.add_argument("--out", default=None, help="directory for kernel_resources.{json,md}")
    args = ap.parse_args(argv)
    if not re.fullmatch(r"\d{2,3}a?", args.arch):
        ap.error(f"--arch must look like 80 or 90a, got {args.arch!r}")
    nvcc = find_nvcc()
    if nvcc is None:
        print("kernel_resources: no nvcc (set CUDA_HOME)", file=sys.stderr)
        return 2
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    extra = include_flags(nvcc)
    rows = []
    for source in args.sources:
        rows += compile_source(nvcc, source, args.arch, extra)
    rows.sort(key=lambda r: (r["source"], -r["spill_stores"] - r["spill_loads"], r["kernel"]))

    spilling = sum(1 for r in rows if r["spill_stores"] or r["spill_loads"])
    head = [f"command: `{C.command_line()}`", "",
            f"{len(rows)} kernels compiled for sm_{args.arch} ({version}), {spilling} of them spill. "
            "Registers per thread; stack and spills in bytes per thread; static shared memory in bytes.", ""]
    table = C.markdown_table(
        ["source", "kernel", "registers", "stack", "spill stores", "spill loads", "smem"],
        [[os.path.basename(r["source"]), f"`{r['kernel']}`", r["registers"], r["stack"],
          r["spill_stores"], r["spill_loads"], r["smem"]] for r in rows])
    markdown = "\n".join(head) + table
    print(markdown)
    for path in C.write_outputs(args.out, "kernel_resources",
                                {"command": C.command_line(), "arch": args.arch, "nvcc": version,
                                 "kernels": rows}, markdown):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
