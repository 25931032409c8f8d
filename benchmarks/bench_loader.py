"""Images/second of the CurriculumLoader backends vs a torchvision DataLoader, CIFAR-sized data.

All loaders deliver pad-4 random crop 32 + horizontal flip + normalize, float32 NCHW batches on
the target device, from a 50,000 x 32 x 32 x 3 uint8 array held in memory, in the same process.

    python benchmarks/bench_loader.py                     # CPU, batch 64 and 256
    python benchmarks/bench_loader.py --device cuda       # where a GPU is available
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from kdseq_fast.data import CurriculumLoader  # noqa: E402
from kdseq_fast.data.dali_backend import dali_import_error  # noqa: E402

MEAN = (125.3, 123.0, 113.9)
STD = (63.0, 62.1, 66.7)


class ArrayCIFAR(torch.utils.data.Dataset):
    """Same per-item work as torchvision.datasets.CIFAR10: PIL image, then the transform."""

    def __init__(self, images, labels, transform):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def time_pass(batches, device, limit):
    """Seconds and images for one pass (or the first `limit` images), device work included."""
    n = 0
    t0 = time.perf_counter()
    for b in batches:
        n += len(b[1]) if isinstance(b, (list, tuple)) else len(b["labels"])
        if limit and n >= limit:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0, n


def torchvision_batches(loader, device):
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50_000, help="images in the array")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=2, help="timed passes per loader (best is kept)")
    ap.add_argument("--tv-limit", type=int, default=0,
                    help="time the torchvision DataLoader on this many images only (0 = full pass)")
    ap.add_argument("--workers", type=int, default=2, help="torchvision DataLoader num_workers")
    args = ap.parse_args()
    device = torch.device(args.device)
    print("command:", "python " + " ".join(shlex.quote(a) for a in sys.argv))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"cpus {len(os.sched_getaffinity(0))}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, args.n).astype(np.int64)
    order = rng.permutation(args.n)

    import torchvision.transforms as T
    tf = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                    T.Normalize([m / 255 for m in MEAN], [s / 255 for s in STD])])
    backends = ["torch"] + (["dali"] if dali_import_error() is None else [])
    if "dali" not in backends:
        print("DALI not measured:", dali_import_error())
    results = {}
    for bs in args.batch_sizes:
        for backend in backends:
            L = CurriculumLoader(images, labels, bs, backend=backend, device=device,
                                 augment="cifar", mean=MEAN, std=STD, seed=0)
            L.set_order(order)
            time_pass(L, device, limit=20 * bs)  # warm-up: pipeline start, allocations
            best = 0.0
            for _ in range(args.repeats):
                L.set_order(order)
                dt, n = time_pass(L, device, 0)
                best = max(best, n / dt)
            L.close()
            results[(backend, bs)] = best
            print(f"  batch {bs:4d}  {'kdseq ' + backend:18s} {best:10.0f} images/s")
        dl = torch.utils.data.DataLoader(ArrayCIFAR(images, labels, tf), batch_size=bs, shuffle=True,
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         persistent_workers=args.workers > 0)
        # Warm-up: a whole pass, so the persistent workers hold no batches of it when the timed
        # passes start; then the best of as many passes as the kdseq backends get.
        time_pass(torchvision_batches(dl, device), device, 0)
        best, n = 0.0, 0
        for _ in range(args.repeats):
            dt, n = time_pass(torchvision_batches(dl, device), device, args.tv_limit)
            best = max(best, n / dt)
        results[("torchvision", bs)] = best
        print(f"  batch {bs:4d}  {'torchvision DL':18s} {best:10.0f} images/s  "
              f"(num_workers={args.workers}, {n} images a pass, best of {args.repeats})")
        del dl
    print("\nsummary (images/s):")
    for bs in args.batch_sizes:
        tv = results[("torchvision", bs)]
        row = ", ".join(f"{b} {results[(b, bs)]:.0f} ({results[(b, bs)] / tv:.1f}x tv)"
                        for b in backends)
        print(f"  batch {bs}: torchvision {tv:.0f}; {row}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import script_main

    sys.exit(script_main(lambda: main() or 0))
