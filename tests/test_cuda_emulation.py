"""The CUDA kernels, run on the CPU: csrc/'s kernel sources compiled as host C++ against a CPU
emulation of the CUDA execution model (tests/cuda_emulation/emu_runtime.h: a host thread per CUDA
thread, real barriers, warp shuffles, per-CTA shared memory and thread-block clusters).

Every layout the planner can choose is forced in turn (one row per warp group of 8 or 32 lanes, one
CTA for everything, a CTA per row, clusters of 2 to 16 CTAs exchanging partial results through
distributed shared memory, the split (row, segment) path and the cluster-refused fallback) and
compared with the float64 references, with the GPU tests' tolerances. What this cannot check --
timing, the hardware exponential, memory ordering on real hardware -- the `cuda` tests and
compute-sanitizer do on a GPU (`make check-gpu`).
"""
import math
import os
import sys
import time
import warnings

import pytest
import torch

import kdseq_fast as kf
from _op_cases import GRAD_TOL, LOSS_TOL, assert_close, make_labels, make_logits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


# A build lock older than this was left by a killed run (the build takes a few minutes at most).
STALE_LOCK_S = 30 * 60


def emulation_build_dir() -> str:
    """One build directory per torch version and Python, inside the checkout: torch's default JIT
    directory is shared by every environment with the same Python and CUDA, so two torch versions
    would rebuild over each other's library (or load one built against the other's ABI)."""
    tag = f"torch-{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    path = os.path.join(ROOT, "build", "cuda_emulation", tag)
    os.makedirs(path, exist_ok=True)
    lock = os.path.join(path, "lock")
    # torch's FileBaton waits, without a timeout, for the lock of a build that may have died.
    if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > STALE_LOCK_S:
        warnings.warn(f"removing a stale build lock left by a killed run: {lock}")
        os.remove(lock)
    return path


def headers_digest(here: str) -> str:
    """A digest of the kernel sources the emulation includes. torch's load() rebuilds when its
    source file or flags change, not when a header does; this digest, passed as a flag, makes an
    edit of csrc/ rebuild the emulation instead of testing the kernels as they were."""
    import glob
    import hashlib

    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "*")) + glob.glob(os.path.join(here, "*.h"))):
        with open(path, "rb") as fh:
            h.update(os.path.basename(path).encode() + b"\0" + fh.read())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def emu():
    from torch.utils.cpp_extension import load

    here = os.path.join(ROOT, "tests", "cuda_emulation")
    load(name="kdseq_emu", sources=[os.path.join(here, "kdseq_emu.cpp")],
         extra_include_paths=[os.path.join(ROOT, "csrc"), here],
         extra_cflags=["-O1", "-std=c++20", "-DKDSEQ_CUDA_EMULATION", "-pthread", "-Wno-unknown-pragmas",
                       f"-DKDSEQ_EMU_SOURCES={headers_digest(here)}"],
         extra_ldflags=["-pthread"], build_directory=emulation_build_dir(), is_python_module=False,
         verbose=False)
    return torch.ops.kdseq_emu


def emu_loss(emu, s, t, y=None, *, plan="", temperature=4.0, kd_weight=1.0, ce_weight=0.0,
             reduction="mean", ignore_index=-100, compute_grad=True):
    return emu.kd_loss(s, t, y, temperature, kd_weight, ce_weight, REDUCTIONS[reduction], ignore_index,
                       compute_grad, plan)


def compare(emu, s, t, y=None, *, plan="", expect=None, what="", **kw):
    """Emulated loss and gradient vs the float64 reference (the same bounds as the GPU tests)."""
    loss, grad, ran = emu_loss(emu, s, t, y, plan=plan, **kw)
    if expect is not None:
        assert ran.startswith(expect), (what, ran)
    s64 = s.detach().double().requires_grad_()
    ref = kf.kd_loss_reference(s64, t.double(), y, **kw)
    (ref_grad,) = torch.autograd.grad(ref.sum(), s64)
    atol, rtol = LOSS_TOL[s.dtype]
    if s.dtype != torch.float64:
        T = kw.get("temperature", 4.0)
        rows = s.shape[0] if kw.get("reduction", "mean") in ("sum", "none") else 1
        atol += kw.get("kd_weight", 1.0) * T * T * (1 + math.log(s.shape[1])) * 1e-6 * rows
    assert_close(loss, ref, (atol, rtol), f"{what} [{ran}] loss")
    g_atol, g_rtol = GRAD_TOL[s.dtype]
    if s.dtype != torch.float64:
        g_atol += (kw.get("kd_weight", 1.0) * kw.get("temperature", 4.0) + kw.get("ce_weight", 0.0)) * 5e-7
    assert grad.dtype == s.dtype and grad.shape == s.shape
    assert_close(grad, ref_grad, (g_atol, g_rtol), f"{what} [{ran}] grad")
    return loss, grad, ran


LAYOUTS = [
    # (B, C, forced plan, mode the call must report)
    (40, 100, "", "single,group=8,e=16,cluster=2"),  # small: one launch counts, computes, reduces
    (257, 100, "", "single,group=8,e=16,cluster=8"),  # 8 CTAs sharing 9 row blocks, one cluster sum
    (300, 100, "mode=single,group=8,e=16,cluster=5", "single,group=8,e=16,cluster=5"),
    (300, 100, "mode=single,group=8,e=16,cluster=5,nocluster", "single,group=8,e=16,cluster=1"),  # one CTA
    (300, 100, "mode=warp,group=8,e=16", "warp,group=8"),  # 8-lane groups, several CTAs, last-CTA sum
    (70, 500, "mode=warp,group=32,e=16", "warp,group=32"),
    (9, 1000, "", "cta"),                           # a CTA per row
    (5, 3001, "mode=cta,e=16", "cta"),
    (3, 5000, "mode=cluster,cluster=3,e=8", "cluster,group=256,e=8,cluster=3"),
    (2, 9000, "mode=cluster,cluster=5,e=8", "cluster,group=256,e=8,cluster=5"),
    (4, 5000, "mode=split,segments=3", "split"),
    (4, 5001, "mode=twopass", "twopass"),          # statistics then gradient in one CTA per row
    (300, 100, "mode=twopass", "twopass"),
    (3, 5000, "mode=cluster,cluster=3,e=8,nocluster", "split"),   # cluster refused at launch
    (3, 5000, "mode=staged,cluster=3", "staged,group=256,e=8,cluster=3"),  # slices in shared memory
    (5, 3000, "mode=staged,cluster=1", "staged,group=256,e=8,cluster=1"),  # a row a CTA (sm_80 too)
    (2, 9000, "mode=staged", "staged,group=256,e=8,cluster=2"),
    (4, 5001, "mode=staged", "split"),             # rows not a whole number of 16 bytes
    (3, 5000, "mode=staged,cluster=3,nocluster", "split"),
    (2, 9000, "mode=staged,cluster=1,smem=4096", "split"),  # the slice does not fit shared memory
    # The planner's choice with a preferred candidate layout for long rows (bench_kd_loss --plans).
    (2, 9000, "prefer=staged", "staged,group=256,e=8,cluster=2"),  # instead of a register cluster
    (40, 9000, "prefer=staged", "staged,group=256,e=8,cluster=2"),  # instead of the split path
    (5, 3001, "prefer=staged", "cta"),             # short rows keep the planner's choice
    (3, 9000, "prefer=staged,nocluster", "split"),  # a refused cluster: the split path
    (40, 9000, "prefer=twopass", "twopass"),       # many rows: the split path's one CTA a row
    (2, 9000, "prefer=twopass", "cluster"),        # few rows: twopass cannot spread a row over CTAs
]


@pytest.mark.parametrize("B,C,plan,expect", LAYOUTS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_every_layout_matches_reference(emu, B, C, plan, expect, reduction):
    # Every reduction in fp32; bf16 (the other load/store width) with the mean (CI time).
    for dtype in (torch.float32, torch.bfloat16) if reduction == "mean" else (torch.float32,):
        s = make_logits(B, C, dtype=dtype, seed=B + C)
        t = make_logits(B, C, dtype=dtype, seed=B * C)
        y = make_labels(B, C)
        y[B // 2] = -100
        compare(emu, s, t, y, plan=plan, expect=expect, temperature=3.0, kd_weight=0.9, ce_weight=0.1,
                reduction=reduction, what=f"B={B} C={C} {dtype}")
        # Without the CE term the kernels keep two register arrays instead of three.
        forced = "mode=" in plan or "prefer=" in plan
        compare(emu, s, t, None, plan=plan, expect=expect.split(",e=")[0] if forced else None,
                temperature=2.0, kd_weight=1.3, reduction=reduction, what=f"no labels B={B} C={C} {dtype}")


@pytest.mark.parametrize("B,with_labels,expect", [
    (4, True, "cluster"), (8, True, "split"), (8, False, "cluster"), (32, False, "split")])
def test_planner_takes_whole_row_split_with_many_rows(emu, B, with_labels, expect):
    # Rows too long for one CTA (9000 classes): clusters while rows are few, the split path with one
    # segment a row from 2 x SMs rows with the CE term and 8 x SMs without (the H200 measurements
    # in plan_kd_loss); the emulated device has 4 SMs.
    s, t = make_logits(B, 9000, seed=B), make_logits(B, 9000, seed=B + 1)
    y = make_labels(B, 9000) if with_labels else None
    _, _, ran = compare(emu, s, t, y, plan="", expect=expect, temperature=2.0, kd_weight=0.9,
                        ce_weight=0.1 if with_labels else 0.0, what=f"B={B}")
    if expect == "split":
        assert ",segments=1" in ran, ran


def test_sixteen_cta_cluster(emu):
    s, t = make_logits(1, 30000, seed=1), make_logits(1, 30000, seed=2)
    compare(emu, s, t, torch.tensor([29999]), plan="mode=cluster,cluster=16,e=8", expect="cluster",
            temperature=1.5, kd_weight=0.9, ce_weight=0.1, what="16 CTAs")


@pytest.mark.parametrize("s_dtype,t_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float32), (torch.float16, torch.bfloat16)])
@pytest.mark.parametrize("plan", ["", "mode=cta,e=8", "mode=split,segments=2", "mode=twopass"])
def test_mixed_dtypes(emu, s_dtype, t_dtype, plan):
    for C in (100, 1500):
        s = make_logits(16, C, dtype=s_dtype, seed=C)
        t = make_logits(16, C, dtype=t_dtype, seed=C + 1)
        if plan.startswith("mode=cta") and C <= 100:
            continue
        compare(emu, s, t, make_labels(16, C), plan=plan, temperature=2.0, kd_weight=0.9, ce_weight=0.1,
                what=f"{s_dtype}/{t_dtype} C={C}")


@pytest.mark.parametrize("s_dtype,t_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.bfloat16), (torch.bfloat16, torch.bfloat16)])
def test_staged_rows_mixed_dtypes_and_spare_ctas(emu, s_dtype, t_dtype):
    # Slices start on 8 columns (16 bytes of a 16-bit row); 48 columns over 5 CTAs leaves two CTAs
    # of the cluster without columns: they still take part in every cluster reduction.
    for B, C, plan, ctas in [(6, 1504, "mode=staged,cluster=3", 3), (3, 48, "mode=staged,cluster=5", 5),
                             (4, 200, "mode=staged,cluster=1", 1)]:
        s = make_logits(B, C, dtype=s_dtype, seed=C)
        t = make_logits(B, C, dtype=t_dtype, seed=C + 1)
        y = make_labels(B, C)
        y[0] = C - 1
        _, _, ran = compare(emu, s, t, y, plan=plan, expect=f"staged,group=256,e=8,cluster={ctas}", temperature=2.0,
                            kd_weight=0.9, ce_weight=0.1, reduction="sum", what=f"{s_dtype}/{t_dtype} C={C}")


def test_staged_rows_need_aligned_rows(emu):
    # A row slice of a wider tensor that starts 4 bytes in: no 16-byte copies, the split path runs.
    wide = make_logits(6, 1028, seed=3)
    compare(emu, wide[:, 1:1025], make_logits(6, 1024, seed=4), make_labels(6, 1024), plan="mode=staged,cluster=2",
            expect="split", temperature=2.0, kd_weight=0.9, ce_weight=0.1, what="unaligned rows")
    compare(emu, wide[:, 4:1028], make_logits(6, 1024, seed=4), make_labels(6, 1024), plan="mode=staged,cluster=2",
            expect="staged", temperature=2.0, kd_weight=0.9, ce_weight=0.1, what="aligned row slices")
    s = make_logits(4, 64, dtype=torch.float64)
    compare(emu, s, make_logits(4, 64, dtype=torch.float64, seed=1), plan="mode=staged", expect="split",
            what="fp64")


@pytest.mark.parametrize("layout", ["transposed", "strided"])
@pytest.mark.parametrize("C", [99, 2051])
def test_scalar_path_and_strided_rows(emu, layout, C):
    s = make_logits(12, C, layout=layout, seed=1)
    t = make_logits(12, C, layout=layout, seed=2)
    compare(emu, s, t, make_labels(12, C), temperature=3.0, kd_weight=0.9, ce_weight=0.1, what=layout)
    # Row slices of a wider tensor: strided rows, unit columns (no copy).
    wide = make_logits(12, C + 8, seed=3)
    compare(emu, wide[:, 4:4 + C], make_logits(12, C, seed=4), make_labels(12, C), temperature=2.0,
            kd_weight=0.9, ce_weight=0.1, what="row slice")


def test_fp16_and_all_dtypes_every_size(emu):
    for B, C in [(1, 2), (5, 3), (64, 100), (33, 1000), (7, 1025), (3, 4099)]:
        for dtype in DTYPES:
            s = make_logits(B, C, dtype=dtype, seed=B + C)
            t = make_logits(B, C, dtype=dtype, seed=B * C)
            compare(emu, s, t, make_labels(B, C), temperature=4.0, kd_weight=0.9, ce_weight=0.1,
                    what=f"B={B} C={C} {dtype}")


@pytest.mark.parametrize("plan", ["", "mode=warp,group=32,e=16", "mode=cta,e=8", "mode=cluster,cluster=2,e=8",
                                  "mode=split,segments=2", "mode=twopass", "mode=staged,cluster=2"])
def test_masks_extremes_and_nan(emu, plan):
    B, C = 6, 300
    s, t = make_logits(B, C, seed=11), make_logits(B, C, seed=12)
    mask = torch.zeros(B, C, dtype=torch.bool)
    mask[:, 250:] = True
    mask[2, :100] = True
    s = s.masked_fill(mask, float("-inf"))
    t = t.masked_fill(mask, float("-inf"))
    y = torch.tensor([0, 5, 120, 7, 149, 3])
    loss, grad, _ = compare(emu, s, t, y, plan=plan, temperature=4.0, kd_weight=0.9, ce_weight=0.1,
                            reduction="none", what="masked")
    assert torch.isfinite(loss).all() and (grad[mask] == 0).all()
    big_s = make_logits(8, 300, scale=4e3, seed=7).clamp(-1e4, 1e4)
    big_t = make_logits(8, 300, scale=4e3, seed=8).clamp(-1e4, 1e4)
    compare(emu, big_s, big_t, make_labels(8, 300), plan=plan, temperature=0.5, kd_weight=0.9, ce_weight=0.1,
            what="extreme")
    for where in ("student", "teacher"):
        a, b = make_logits(4, 300), make_logits(4, 300, seed=1)
        (a if where == "student" else b)[2, 77] = math.nan
        # A lane's, a warp's and a segment's first elements all NaN (then -inf): the running
        # maximum skips NaN, and these once counted as masked classes.
        (a if where == "student" else b)[1, :160] = math.nan
        (a if where == "student" else b)[1, 160:163] = -math.inf
        rows, grad, _ = emu_loss(emu, a, b, torch.tensor([0, 299, 5, 7]), plan=plan, ce_weight=0.1,
                                 kd_weight=0.9, reduction="none")
        assert torch.isnan(rows[[1, 2]]).all() and torch.isfinite(rows[[0, 3]]).all(), where
        assert torch.isnan(grad[1]).all() and torch.isfinite(grad[[0, 3]]).all(), where


@pytest.mark.parametrize("plan", ["", "mode=cta,e=8", "mode=cluster,cluster=2,e=8", "mode=split,segments=2",
                                  "mode=twopass", "mode=staged,cluster=2"])
def test_out_of_range_labels_give_nan_rows_never_a_bad_read(emu, plan):
    C = 300
    s, t = make_logits(5, C), make_logits(5, C, seed=1)
    y = torch.tensor([3, C, -5, -100, 1_000_000_000])
    rows, grad, _ = emu_loss(emu, s, t, y, plan=plan, ce_weight=0.1, kd_weight=0.9, reduction="none")
    assert torch.isnan(rows[[1, 2, 4]]).all() and torch.isfinite(rows[0]) and rows[3] == 0
    assert torch.isnan(grad[[1, 2, 4]]).all() and torch.isfinite(grad[0]).all() and (grad[3] == 0).all()
    mean, _, _ = emu_loss(emu, s, t, y, plan=plan, ce_weight=0.1, kd_weight=0.9)
    assert torch.isnan(mean)


def test_ignored_rows_and_all_ignored(emu):
    for plan in ("", "mode=warp,group=8,e=8", "mode=cta,e=8", "mode=split,segments=2"):
        s, t = make_logits(10, 50), make_logits(10, 50, seed=9)
        y = torch.full((10,), 7)
        for reduction in ("mean", "sum"):
            loss, grad, _ = emu_loss(emu, s, t, y, plan=plan, ce_weight=0.1, kd_weight=0.9,
                                     reduction=reduction, ignore_index=7)
            assert float(loss) == 0.0 and (grad == 0).all(), plan


def test_fp64_split_path_and_no_grad(emu):
    s = make_logits(5, 7, dtype=torch.float64)
    t = make_logits(5, 7, dtype=torch.float64, seed=4)
    y = torch.tensor([0, 3, -100, 6, 2])
    for reduction in ("mean", "sum", "none"):
        compare(emu, s, t, y, expect="split", temperature=2.5, kd_weight=0.7, ce_weight=0.3, reduction=reduction,
                what="fp64")
    loss, grad, _ = emu_loss(emu, make_logits(4, 10), make_logits(4, 10, seed=3), compute_grad=False)
    assert grad.numel() == 0
    assert_close(loss, kf.kd_loss_reference(make_logits(4, 10), make_logits(4, 10, seed=3)),
                 LOSS_TOL[torch.float32], "no grad")


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_scale_kernel(emu, dtype):
    g = make_logits(9, 103, dtype=dtype)
    kept = g.clone()
    emu.grad_scale_(g, torch.tensor(1.0), False)
    assert torch.equal(g, kept)  # a factor of 1 leaves every bit alone (the blocks return at once)
    emu.grad_scale_(g, torch.tensor(0.5), False)
    assert_close(g, kept.double() * 0.5, (0, 1e-2 if dtype != torch.float32 else 1e-6), "scaled")
    rows = torch.linspace(0, 2, 9)
    rows[3] = 1.0
    g2 = kept.clone()
    emu.grad_scale_(g2, rows, True)
    assert torch.equal(g2[3], kept[3])
    assert_close(g2, kept.double() * rows.double()[:, None], (0, 1e-2 if dtype != torch.float32 else 1e-6),
                 "per row")


def check_scores(emu, s, y, t=None, T=4.0, what=""):
    got = emu.instance_scores(s, y, t, T)
    ref = kf.instance_scores_reference(s, y, t, temperature=T)
    tol = (2e-5, 2e-5) if s.dtype == torch.float32 else (5e-5, 5e-5)
    assert_close(got[:, :5], ref[:, :5], (tol[0] * max(1.0, T * T), tol[1]), f"{what} scores")
    assert torch.equal(got[:, 5], ref[:, 5].float()), what
    return got


def test_instance_scores_every_group(emu):
    for B, C in [(3, 2), (50, 100), (40, 1000), (4, 5000)]:       # groups of 8, 32, 32 and a CTA
        for dtype in DTYPES:
            s = make_logits(B, C, dtype=dtype, seed=C)
            t = make_logits(B, C, dtype=dtype, seed=C + 1)
            y = make_labels(B, C)
            check_scores(emu, s, y, t, what=f"B={B} C={C} {dtype}")
            check_scores(emu, s, y, None, T=2.0, what=f"no teacher B={B} C={C}")
    # Ties: the first maximum wins, across lanes and chunks.
    s = torch.zeros(3, 4000)
    s[0, [5, 300, 3999]] = 7.0
    s[1, [2500, 2501]] = 3.0
    out = check_scores(emu, s, torch.tensor([300, 2500, 0]), what="ties")
    assert out[:, 5].tolist() == [0.0, 1.0, 1.0]
    s = make_logits(6, 3000, layout="strided", seed=3)
    check_scores(emu, s, make_labels(6, 3000), make_logits(6, 3000, layout="transposed"), what="layouts")
    bad = emu.instance_scores(make_logits(3, 50), torch.tensor([1, 50, -1]), None, 4.0)
    assert torch.isnan(bad[1:]).all() and torch.isfinite(bad[0]).all()


@pytest.mark.parametrize("plan", ["mode=split,segments=3", "", "mode=twopass", "mode=cluster,cluster=3,e=8"])
def test_a_ce_weight_that_rounds_to_zero_in_fp32_is_no_ce_term(emu, plan):
    # 1e-50 is not 0 in double but is in fp32: the host once switched the CE term on while the
    # split statistics kernel, reading the fp32 weight, left it off (NaN loss and gradient).
    s, t, y = make_logits(4, 5000), make_logits(4, 5000, seed=1), make_labels(4, 5000)
    loss, grad, _ = emu_loss(emu, s, t, y, plan=plan, ce_weight=1e-50)
    plain, plain_grad, _ = emu_loss(emu, s, t, y, plan=plan, ce_weight=0.0)
    assert torch.isfinite(loss) and torch.equal(loss, plain) and torch.equal(grad, plain_grad)


def test_instance_scores_rows_with_nan_match_the_cpu(emu):
    # NaN is never the argmax on either device: `correct` and `margin` skip it, the rest is NaN.
    for C in (50, 1000, 5000):  # groups of 8, 32 and a CTA
        s = make_logits(5, C, seed=C)
        s[0] = math.nan                      # all NaN
        s[1, 0], s[1, 1:] = math.nan, -math.inf  # NaN first, then the maximum (-inf) at the label
        s[2, C // 2] = math.nan              # one NaN away from the label
        s[3, : C // 2] = math.nan            # NaN chunks before the real maximum
        y = torch.tensor([0, 1, 3, C - 1, 2])
        t = make_logits(5, C, seed=C + 1)
        t[4, :C // 2] = math.nan             # the teacher's NaN chunks before its maximum
        for teacher in (None, t):
            got = emu.instance_scores(s, y, teacher, 4.0)
            cpu = kf.instance_scores(s, y, teacher, temperature=4.0)
            torch.testing.assert_close(got, cpu, rtol=2e-5, atol=2e-5, equal_nan=True, msg=f"C={C}")
            # Both against the float64 reference: NaN where it is NaN (not only where the CPU is).
            ref = kf.instance_scores_reference(s, y, teacher, temperature=4.0).float()
            assert torch.equal(torch.isnan(got), torch.isnan(ref)), (C, teacher is None)
