"""How often a finished torchrun rank dies at exit, with and without ``runtime.exit_process``.

Each run is a two-rank gloo job (``torch.distributed.run --standalone``) of a minimal DDP script:
a Linear layer, three backward passes, ``destroy_process_group()``; one rank leaves ``--pause``
seconds before the other (as rank 1 does while rank 0 writes the summary and plots). ``plain``
then exits the ordinary way, ``exit_process`` through :func:`kdseq_fast.runtime.exit_process`.
PyTorch keeps the DDP group's threads alive past ``destroy_process_group``, and some ordinary
exits abort (SIGABRT, "terminate called without an active exception"): the count of those runs is
the measurement. CPU only; about 4 s per run on 2 cores.

    python benchmarks/exit_aborts.py --runs 150
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from _common import command_line  # noqa: E402

VARIANTS = ("plain", "exit_process")


def worker(variant: str, pause: float) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))
    for _ in range(3):
        model(torch.randn(4, 3)).sum().backward()
    del model
    dist.all_reduce(torch.ones(2))
    if dist.get_rank() == 0:
        time.sleep(pause)
    dist.destroy_process_group()
    if variant == "exit_process":
        from kdseq_fast.runtime import exit_process

        exit_process(0)


def one_run(variant: str, pause: float) -> str:
    """'ok', 'abort' (a rank died of SIGABRT/terminate) or 'other' (any other failure)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           os.path.abspath(__file__), "--worker", variant, "--pause", str(pause)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        return "ok"
    if "terminate called" in proc.stderr or "SIGABRT" in proc.stderr:
        return "abort"
    sys.stderr.write(proc.stderr[-2000:])
    return "other"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=50, help="two-rank jobs per variant (default 50)")
    ap.add_argument("--pause", type=float, default=0.2,
                    help="seconds rank 0 stays after rank 1 has left (default 0.2)")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.worker, args.pause)
        return 0
    if args.runs < 1:
        ap.error(f"--runs must be >= 1, got {args.runs}")
    if args.pause < 0:
        ap.error(f"--pause must be >= 0, got {args.pause}")
    from tqdm.auto import tqdm

    print(f"# {command_line()}")
    counts = {}
    for variant in args.variants:
        c = counts[variant] = {"ok": 0, "abort": 0, "other": 0}
        for _ in tqdm(range(args.runs), desc=variant, unit="job", leave=False):
            c[one_run(variant, args.pause)] += 1
    print("| exit | jobs | aborted at exit | other failures |")
    print("|---|---|---|---|")
    for variant, c in counts.items():
        print(f"| {variant} | {sum(c.values())} | {c['abort']} | {c['other']} |")
    return 1 if any(c["other"] for c in counts.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
