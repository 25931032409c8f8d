"""Drives both CUDA ops through every kernel layout, forward and backward, for
`compute-sanitizer --tool memcheck` (run by `make check-gpu`; not a pytest file).

Each layout is forced with torch.ops.kdseq._force_plan on small shapes so the sanitizer run stays
short; the inputs include ragged tails (C not a multiple of 4: the scalar path), strided rows,
every dtype, ignored rows and out-of-range labels (validate=False: NaN rows, never a bad read).
"""
import sys

import torch

import kdseq_fast as kf

LAYOUTS = [
    (40, 100, ""), (257, 100, ""), (300, 100, "mode=single,group=8,e=16,cluster=5"),
    (300, 100, "mode=warp,group=8,e=16"), (70, 500, "mode=warp,group=32,e=16"),
    (9, 1000, "mode=cta,e=8"), (3, 5000, "mode=cluster,cluster=3,e=8"), (2, 30000, "mode=cluster,cluster=16,e=8"),
    (4, 5001, "mode=split,segments=3"), (4, 5001, "mode=twopass"), (2, 131076, ""), (5, 103, ""),
    (3, 5000, "mode=staged,cluster=3"), (5, 3000, "mode=staged,cluster=1"), (2, 40000, "mode=staged,cluster=16"),
]


def main() -> int:
    dev = torch.device("cuda")
    g = torch.Generator(device="cpu").manual_seed(0)
    calls = 0
    for B, C, plan in LAYOUTS:
        torch.ops.kdseq._force_plan(plan)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for rows_strided in (False, True):
                width = C + 8 if rows_strided else C
                s = (torch.randn(B, width, generator=g) * 3).to(dev, dtype)[:, :C].requires_grad_()
                t = (torch.randn(B, C, generator=g) * 3).to(dev, dtype)
                y = torch.randint(0, C, (B,), generator=g).to(dev)
                y[0] = -100
                if B > 2:
                    y[1] = C + 7  # out of range, not ignored
                for reduction in ("mean", "sum", "none"):
                    loss = kf.kd_loss(s, t, y, ce_weight=0.1, kd_weight=0.9, reduction=reduction, validate=False)
                    (loss.sum() if reduction == "none" else loss * 1.5).backward()
                    calls += 1
                kf.instance_scores(s.detach(), y, t, validate=False)
                kf.instance_scores(s.detach(), y, None, validate=False)
        torch.ops.kdseq._force_plan("")
    s = torch.randn(5, 7, dtype=torch.float64, device=dev, requires_grad=True)
    kf.kd_loss(s, torch.randn(5, 7, dtype=torch.float64, device=dev), torch.tensor([0, 1, 2, 3, -100], device=dev),
               ce_weight=0.3).backward()
    torch.cuda.synchronize()
    print(f"sanitizer driver: {calls} kd_loss forward+backward calls over {len(LAYOUTS)} layouts, and the scores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
