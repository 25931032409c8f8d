"""kd_loss / KDLoss against the float64 plain-PyTorch reference, on CPU and (marked `cuda`) GPU."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kdseq_fast as kf
from _op_cases import GRAD_TOL, LOSS_TOL, assert_close, make_labels, make_logits

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def run_and_compare(s, t, y=None, *, what="", **kw):
    """Loss and student gradient of the op vs the float64 reference on the same input values."""
    s = s.detach().requires_grad_()
    loss = kf.kd_loss(s, t, y, **kw)
    assert loss.dtype == (torch.float64 if s.dtype == torch.float64 else torch.float32)
    upstream = torch.randn_like(loss, dtype=torch.float64).to(loss.dtype) if loss.dim() else torch.tensor(1.7, dtype=loss.dtype, device=loss.device)
    (grad,) = torch.autograd.grad(loss, s, grad_outputs=upstream)
    assert grad.dtype == s.dtype and grad.shape == s.shape

    s64 = s.detach().double().requires_grad_()
    ref = kf.kd_loss_reference(s64, t.double(), y, **kw)
    (ref_grad,) = torch.autograd.grad(ref, s64, grad_outputs=upstream.double())
    # fp32 log-probabilities carry ~1 ulp of log C; the KD term multiplies them by T^2.
    atol, rtol = LOSS_TOL[s.dtype]
    if s.dtype != torch.float64:
        T = kw.get("temperature", 4.0)
        rows = s.shape[0] if kw.get("reduction", "mean") == "sum" else 1
        atol += kw.get("kd_weight", 1.0) * T * T * (1 + math.log(s.shape[1])) * 1e-6 * rows
    assert_close(loss, ref, (atol, rtol), f"{what} loss")
    # Gradient = kd_weight*T*(p_s - p_t) + ce_weight*(...): fp32 probabilities carry ~1e-7 absolute
    # error, scaled by kd_weight*T (the reduction's 1/B scales expected and error alike).
    g_atol, g_rtol = GRAD_TOL[s.dtype]
    if s.dtype != torch.float64:
        g_atol += (kw.get("kd_weight", 1.0) * kw.get("temperature", 4.0) + kw.get("ce_weight", 0.0)) * 5e-7
    assert_close(grad, ref_grad, (g_atol, g_rtol), f"{what} grad")
    return loss, grad


def check_shapes_dtypes(device):
    for B, C in [(1, 2), (5, 3), (64, 100), (33, 1000), (7, 1025), (3, 4099), (2, 32000)]:
        for dtype in DTYPES:
            s = make_logits(B, C, dtype=dtype, device=device, seed=B + C)
            t = make_logits(B, C, dtype=dtype, device=device, seed=B * C)
            y = make_labels(B, C, device=device)
            for reduction in ("mean", "sum", "none"):
                run_and_compare(s, t, y, temperature=4.0, kd_weight=0.9, ce_weight=0.1, reduction=reduction,
                                what=f"{device} B={B} C={C} {dtype} {reduction}")


def test_matches_reference_shapes_dtypes_reductions():
    check_shapes_dtypes("cpu")


@pytest.mark.parametrize("s_dtype,t_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float32), (torch.float32, torch.float16)])
def test_mixed_student_teacher_dtypes(s_dtype, t_dtype):
    s = make_logits(16, 300, dtype=s_dtype)
    t = make_logits(16, 300, dtype=t_dtype, seed=5)
    y = make_labels(16, 300)
    run_and_compare(s, t, y, temperature=2.0, kd_weight=0.9, ce_weight=0.1, what="mixed")


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0, 8.0, 20.0])
def test_temperatures(temperature):
    s, t = make_logits(32, 500, seed=3), make_logits(32, 500, seed=4)
    run_and_compare(s, t, make_labels(32, 500), temperature=temperature, kd_weight=1.0, ce_weight=0.5,
                    what=f"T={temperature}")


@pytest.mark.parametrize("temperature", [0.5, 4.0, 20.0])
def test_extreme_logits_fp32(temperature):
    # Logits up to +-1e4: centred log-probabilities keep the result finite and accurate.
    s = make_logits(8, 1000, scale=4e3, seed=7).clamp(-1e4, 1e4)
    t = make_logits(8, 1000, scale=4e3, seed=8).clamp(-1e4, 1e4)
    loss, grad = run_and_compare(s, t, make_labels(8, 1000), temperature=temperature, kd_weight=0.9,
                                 ce_weight=0.1, what="extreme")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_masked_classes_minus_inf():
    B, C = 6, 200
    s, t = make_logits(B, C, seed=11), make_logits(B, C, seed=12)
    mask = torch.zeros(B, C, dtype=torch.bool)
    mask[:, 150:] = True
    mask[2, :100] = True
    s = s.masked_fill(mask, float("-inf"))
    t = t.masked_fill(mask, float("-inf"))
    y = torch.tensor([0, 5, 120, 7, 149, 3])
    loss, grad = run_and_compare(s, t, y, temperature=4.0, kd_weight=0.9, ce_weight=0.1, reduction="none",
                                 what="masked")
    assert torch.isfinite(loss).all()
    assert (grad[mask] == 0).all()


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_non_contiguous_inputs(layout):
    s = make_logits(24, 777, layout=layout, seed=1)
    t = make_logits(24, 777, layout=layout, seed=2)
    assert not s.is_contiguous()
    run_and_compare(s, t, make_labels(24, 777), temperature=3.0, kd_weight=0.9, ce_weight=0.1, what=layout)


def test_ignore_index_rows_and_all_ignored():
    B, C = 10, 50
    s, t = make_logits(B, C), make_logits(B, C, seed=9)
    y = make_labels(B, C)
    y[[1, 4, 7]] = -100
    for reduction in ("mean", "sum", "none"):
        loss, grad = run_and_compare(s, t, y, kd_weight=0.9, ce_weight=0.1, reduction=reduction, what="ignore")
        assert (grad[[1, 4, 7]] == 0).all()
    y_all = torch.full((B,), 7, dtype=torch.long)
    for reduction in ("mean", "sum"):
        sg = s.clone().requires_grad_()
        loss = kf.kd_loss(sg, t, y_all, kd_weight=0.9, ce_weight=0.1, reduction=reduction, ignore_index=7)
        loss.backward()
        assert loss.item() == 0.0
        assert (sg.grad == 0).all()


def test_custom_ignore_index_and_no_labels():
    s, t = make_logits(8, 20), make_logits(8, 20, seed=2)
    y = make_labels(8, 20)
    y[0] = 255
    run_and_compare(s, t, y, ce_weight=1.0, kd_weight=0.5, ignore_index=255, what="ignore 255")
    run_and_compare(s, t, None, kd_weight=2.0, what="no labels")


def test_teacher_gets_no_gradient_and_fp16_student_grad_dtype():
    s = make_logits(4, 10, dtype=torch.float16).requires_grad_()
    t = make_logits(4, 10, seed=3).requires_grad_()
    kf.kd_loss(s, t).backward()
    assert t.grad is None
    assert s.grad.dtype == torch.float16


def test_no_grad_path_skips_gradient():
    s, t = make_logits(4, 10).requires_grad_(), make_logits(4, 10, seed=3)
    with torch.no_grad():
        loss = kf.kd_loss(s, t)
    assert not loss.requires_grad
    assert_close(loss, kf.kd_loss_reference(s, t), LOSS_TOL[torch.float32], "no_grad")


def test_gradcheck_double():
    s = make_logits(5, 7, dtype=torch.float64).requires_grad_()
    t = make_logits(5, 7, dtype=torch.float64, seed=4)
    y = torch.tensor([0, 3, -100, 6, 2])
    for reduction in ("mean", "sum", "none"):
        assert torch.autograd.gradcheck(
            lambda x: kf.kd_loss(x, t, y, temperature=2.5, kd_weight=0.7, ce_weight=0.3, reduction=reduction),
            (s,), eps=1e-6, atol=1e-7)


def test_kdloss_module_matches_function():
    s, t, y = make_logits(9, 30), make_logits(9, 30, seed=5), make_labels(9, 30)
    crit = kf.KDLoss(temperature=4.0, kd_weight=0.9, ce_weight=0.1)
    assert "temperature=4.0" in repr(crit)
    torch.testing.assert_close(crit(s, t, y), kf.kd_loss(s, t, y, temperature=4.0, kd_weight=0.9, ce_weight=0.1))
    with pytest.raises(ValueError, match="temperature"):
        kf.KDLoss(temperature=0)
    with pytest.raises(ValueError, match="reduction"):
        kf.KDLoss(reduction="avg")


def test_matches_pytorch_eager_formula():
    # The formula users write by hand (the benchmark's eager baseline).
    s, t = make_logits(16, 100), make_logits(16, 100, seed=6)
    T = 4.0
    eager = F.kl_div(F.log_softmax(s / T, 1), F.softmax(t / T, 1), reduction="none").sum(1).mean() * T * T
    torch.testing.assert_close(kf.kd_loss(s, t, temperature=T), eager, rtol=1e-5, atol=1e-6)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 40), C=st.integers(2, 3000), T=st.floats(0.5, 20.0),
       kdw=st.floats(0.0, 2.0), cew=st.floats(0.0, 2.0), scale=st.sampled_from([0.1, 1.0, 10.0, 100.0]),
       reduction=st.sampled_from(["mean", "sum", "none"]), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 10_000))
def test_hypothesis_random_problems(B, C, T, kdw, cew, scale, reduction, dtype, seed):
    s = make_logits(B, C, dtype=dtype, scale=scale, seed=seed)
    t = make_logits(B, C, dtype=dtype, scale=scale, seed=seed + 1)
    y = make_labels(B, C, seed=seed + 2)
    run_and_compare(s, t, y, temperature=T, kd_weight=kdw, ce_weight=cew, reduction=reduction, what="hypothesis")


def test_very_long_rows_split_across_threads():
    # Few rows, LLM-sized vocabulary: rows are split into segments merged with the online rule.
    for C in (65_536, 262_144):
        s, t = make_logits(1, C, seed=C), make_logits(1, C, seed=C + 1)
        run_and_compare(s, t, torch.tensor([C - 1]), temperature=1.5, kd_weight=0.9, ce_weight=0.1,
                        what=f"C={C}")


def test_nan_logits_give_nan_loss():
    # The trainer's non-finite guard relies on NaN inputs never producing a finite loss.
    for where in ("student", "teacher"):
        for C in (10, 3000):
            s, t = make_logits(4, C), make_logits(4, C, seed=1)
            (s if where == "student" else t)[2, C // 3] = math.nan
            rows = kf.kd_loss(s, t, reduction="none")
            assert torch.isnan(rows[2]), (where, C)
            assert torch.isfinite(rows[[0, 1, 3]]).all(), (where, C)


@pytest.mark.parametrize("threads", [1, 4])
def test_a_block_of_nan_before_any_finite_logit_still_gives_nan(threads):
    # The running maximum skips NaN: a chunk of NaN (or NaN and -inf) met while it was still -inf
    # counted as masked classes, so the row came out finite (teacher) or +inf (student), with a
    # finite gradient the non-finite guard never saw. Chunks of 256 columns; with 4 threads the
    # 2 rows of C = 32768 take the split path (fewer rows than threads, C >= 16384), whose second
    # segment starts at column 16384 with such a chunk.
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for C, cols in ((600, slice(0, 256)), (600, slice(0, 300)), (32768, slice(16384, 16640)),
                        (32768, slice(0, 256))):
            for where in ("student", "teacher"):
                s, t = make_logits(2, C), make_logits(2, C, seed=1)
                (s if where == "student" else t)[0, cols] = math.nan
                (s if where == "student" else t)[0, cols.stop:cols.stop + 3] = -math.inf
                s.requires_grad_(True)
                y = torch.tensor([C - 1, 3])
                rows = kf.kd_loss(s, t, y, kd_weight=0.9, ce_weight=0.1, reduction="none")
                (grad,) = torch.autograd.grad(rows.sum(), s)
                assert torch.isnan(rows[0]) and torch.isfinite(rows[1]), (C, cols, where)
                assert torch.isnan(grad[0]).all() and torch.isfinite(grad[1]).all(), (C, cols, where)
                scores = kf.instance_scores(s.detach(), y, t)
                nan_cols = ["ce", "p_true", "entropy", "kd"] if where == "student" else ["kd"]
                for name in nan_cols:
                    assert torch.isnan(scores[0, kf.SCORE_FIELDS.index(name)]), (C, cols, where, name)
                assert torch.isfinite(scores[1]).all()
    finally:
        torch.set_num_threads(old)


def test_cpu_gradient_buffer_is_reused_only_when_unreferenced():
    # >= 1 MiB gradients reuse the previous step's storage once nothing references it; anything
    # still holding it (the tensor, a view, a leaf's .grad) must never see it overwritten.
    B, C = 128, 4096

    def step(seed):
        s = make_logits(B, C, seed=seed).requires_grad_()
        t = make_logits(B, C, seed=seed + 1)
        (g,) = torch.autograd.grad(kf.kd_loss(s, t), s)
        return s, t, g

    _, _, g1 = step(0)
    kept = g1.clone()
    s2, t2, g2 = step(10)
    assert g2.data_ptr() != g1.data_ptr()
    assert torch.equal(g1, kept)
    view, view_kept = g2[5], g2[5].clone()
    del g2
    step(20)
    assert torch.equal(view, view_kept)
    del view, g1

    _, _, g = step(30)
    ptr = g.data_ptr()
    del g
    s, t, g = step(40)
    assert g.data_ptr() == ptr  # the released buffer came back
    s64 = s.detach().double().requires_grad_()
    (ref,) = torch.autograd.grad(kf.kd_loss_reference(s64, t), s64)
    assert_close(g, ref, GRAD_TOL[torch.float32], "reused buffer")
    del g

    # Leaf .grad accumulation across steps.
    s = make_logits(B, C, seed=50).requires_grad_()
    t = make_logits(B, C, seed=51)
    kf.kd_loss(s, t).backward()
    first = s.grad.clone()
    kf.kd_loss(s, t).backward()
    step(60)
    assert_close(s.grad, 2 * first, (1e-9, 1e-6), "accumulated .grad")


def test_autograd_paths_agree():
    # The C++ backward hands back the stored gradient for a plain grad_output of 1 and multiplies
    # otherwise; every path must give the same gradient.
    s0, t, y = make_logits(16, 300, seed=3), make_logits(16, 300, seed=4), make_labels(16, 300)
    kw = dict(temperature=3.0, kd_weight=0.8, ce_weight=0.2)
    s64 = s0.double().requires_grad_()
    (ref,) = torch.autograd.grad(kf.kd_loss_reference(s64, t.double(), y, **kw), s64)

    s = s0.clone().requires_grad_()
    loss = kf.kd_loss(s, t, y, **kw)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    assert_close(first, ref, GRAD_TOL[torch.float32], "backward()")
    # The retained graph gives the same gradient again, however often, and the leaf's .grad never
    # aliases the stored gradient (the Python autograd wrapper this replaced failed on the third pass).
    loss.backward(retain_graph=True)
    loss.backward(retain_graph=True)
    assert_close(s.grad, 3 * first, (1e-9, 1e-6), "retain_graph")
    s.grad.zero_()
    loss.backward()
    assert_close(s.grad, first, (1e-9, 1e-6), "backward after zeroing .grad in place")

    (g_one,) = torch.autograd.grad(kf.kd_loss(s, t, y, **kw), s, grad_outputs=torch.tensor(1.0))
    (g_half,) = torch.autograd.grad(kf.kd_loss(s, t, y, **kw), s, grad_outputs=torch.tensor(0.5))
    (g_graph,) = torch.autograd.grad(kf.kd_loss(s, t, y, **kw), s, create_graph=True)
    assert_close(g_one, first, (0, 0), "grad_outputs=1")
    assert_close(g_half, 0.5 * first, (1e-9, 1e-6), "grad_outputs=0.5")
    assert_close(g_graph, first, (1e-9, 1e-6), "create_graph")

    rows = kf.kd_loss(s, t, y, reduction="none", **kw)
    w = torch.linspace(0.0, 2.0, 16)
    (g_rows,) = torch.autograd.grad((rows * w).sum(), s)
    (g_sum,) = torch.autograd.grad(kf.kd_loss(s, t, y, reduction="sum", **kw), s)
    assert_close(g_rows, g_sum * w[:, None], (1e-7, 1e-5), "reduction='none' weighted")

    # functorch transforms cannot run C++ autograd functions; torch says so.
    with pytest.raises(RuntimeError, match="functorch"):
        torch.func.grad(lambda a: kf.kd_loss(a, t))(s0.clone())


BAD_INPUTS = [
    (lambda s, t, y: kf.kd_loss(s[0], t, y), ValueError, "student_logits"),
    (lambda s, t, y: kf.kd_loss(s, t[:, :5], y), ValueError, "teacher_logits"),
    (lambda s, t, y: kf.kd_loss(s, t[:3], y), ValueError, "batch size"),
    (lambda s, t, y: kf.kd_loss(s, t, y[:3], ce_weight=0.1), ValueError, "labels"),
    (lambda s, t, y: kf.kd_loss(s, t, y + 100, ce_weight=0.1), ValueError, "labels"),
    (lambda s, t, y: kf.kd_loss(s, t, y - 100, ce_weight=0.1), ValueError, "labels"),
    (lambda s, t, y: kf.kd_loss(s, t, y.float(), ce_weight=0.1), TypeError, "labels"),
    (lambda s, t, y: kf.kd_loss(s, t, None, ce_weight=0.1), ValueError, "labels"),
    (lambda s, t, y: kf.kd_loss(s, t, y, temperature=0.0), ValueError, "temperature"),
    (lambda s, t, y: kf.kd_loss(s, t, y, temperature=-1.0), ValueError, "temperature"),
    (lambda s, t, y: kf.kd_loss(s, t, y, temperature=math.inf), ValueError, "temperature"),
    (lambda s, t, y: kf.kd_loss(s, t, y, temperature=math.nan), ValueError, "temperature"),
    (lambda s, t, y: kf.kd_loss(s, t, y, temperature="4"), TypeError, "temperature"),
    (lambda s, t, y: kf.kd_loss(s, t, y, temperature=1e200), ValueError, "temperature"),
    (lambda s, t, y: kf.kd_loss(s, t, y, temperature=10**400), ValueError, "temperature"),
    (lambda s, t, y: kf.kd_loss(s, t, y, kd_weight=10**400), ValueError, "kd_weight"),
    (lambda s, t, y: kf.KDLoss(ce_weight=-(10**400)), ValueError, "ce_weight"),
    (lambda s, t, y: kf.instance_scores(s, y, t, temperature=10**400), ValueError, "temperature"),
    # The ops themselves, called directly (the wrapper's checks skipped): float labels were truncated.
    (lambda s, t, y: torch.ops.kdseq.kd_loss(s, t, y.float(), 1.0, 1.0, 1.0, 0, -100, False), RuntimeError,
     "labels must be an integer tensor"),
    (lambda s, t, y: torch.ops.kdseq.instance_scores(s, y.double(), t, 1.0), RuntimeError,
     "labels must be an integer tensor"),
    (lambda s, t, y: kf.kd_loss(s, t, y, temperature=1e-300), ValueError, "temperature"),
    (lambda s, t, y: kf.kd_loss(s.long(), t, y), TypeError, "student_logits"),
    (lambda s, t, y: kf.kd_loss(s, t.int(), y), TypeError, "teacher_logits"),
    (lambda s, t, y: kf.kd_loss(s, t, y, reduction="avg"), ValueError, "reduction"),
    (lambda s, t, y: kf.kd_loss(s, t, y, kd_weight=-1.0), ValueError, "kd_weight"),
    (lambda s, t, y: kf.kd_loss(s, t, y, ce_weight=math.nan), ValueError, "ce_weight"),
    (lambda s, t, y: kf.kd_loss(s.numpy(), t, y), TypeError, "student_logits"),
    (lambda s, t, y: kf.kd_loss(s[:, :1], t[:, :1], y), ValueError, "student_logits"),
    (lambda s, t, y: kf.kd_loss(s, t.to("meta"), y), ValueError, "teacher_logits"),
    (lambda s, t, y: kf.kd_loss(s, t.double(), y), TypeError, "float64"),
    (lambda s, t, y: kf.kd_loss(s, t, y, reduction=[]), ValueError, "reduction"),
    (lambda s, t, y: kf.kd_loss(s, t, y, reduction=None), ValueError, "reduction"),
    (lambda s, t, y: kf.kd_loss(s, t, y, ignore_index=2**64), ValueError, "ignore_index"),
    (lambda s, t, y: kf.kd_loss(s, t, y, ignore_index=1.5), TypeError, "ignore_index"),
    (lambda s, t, y: kf.kd_loss(s, t, y, ignore_index=np.bool_(True)), TypeError, "ignore_index"),
    (lambda s, t, y: kf.kd_loss(s, t, y, kd_weight=1e39), ValueError, "kd_weight"),
    (lambda s, t, y: kf.kd_loss(s, t, y, temperature=np.bool_(True)), TypeError, "temperature"),
    (lambda s, t, y: kf.KDLoss(ignore_index="a"), TypeError, "ignore_index"),
    (lambda s, t, y: kf.KDLoss(reduction={}), ValueError, "reduction"),
    # Labels are checked as int64, the way the kernels read them: a uint8 156 is not -100.
    (lambda s, t, y: kf.kd_loss(s, t, torch.full((4,), 156, dtype=torch.uint8), ce_weight=0.1), ValueError,
     r"labels must be in \[0, 10\) \(or ignore_index=-100\); found 156"),
]


@pytest.mark.parametrize("call,exc,match", BAD_INPUTS)
def test_bad_input_raises_naming_the_argument(call, exc, match):
    s, t, y = make_logits(4, 10), make_logits(4, 10, seed=1), make_labels(4, 10)
    with pytest.raises(exc, match=match):
        call(s, t, y)


def test_torch_compile_fullgraph():
    def step(s, t, y):
        return kf.kd_loss(s, t, y, temperature=4.0, kd_weight=0.9, ce_weight=0.1) * 2.0

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s, t, y = make_logits(8, 40), make_logits(8, 40, seed=1), make_labels(8, 40)
    s1 = s.clone().requires_grad_()
    s2 = s.clone().requires_grad_()
    out_c = compiled(s1, t, y)
    out_e = step(s2, t, y)
    out_c.backward()
    out_e.backward()
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(s1.grad, s2.grad)


def test_torch_compile_fullgraph_with_changing_temperature_and_weights():
    # A schedule that changes T or a weight between calls makes them symbolic floats under
    # torch.compile; the argument checks must trace (they once called math.isfinite on them).
    compiled = torch.compile(lambda s, t, y, T, w: kf.kd_loss(s, t, y, temperature=T, ce_weight=w),
                             fullgraph=True, backend="aot_eager")
    s, t, y = make_logits(8, 40), make_logits(8, 40, seed=1), make_labels(8, 40)
    for T, w in [(4.0, 0.1), (3.0, 0.1), (2.0, 0.25)]:
        s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
        out_c, out_e = compiled(s1, t, y, T, w), kf.kd_loss(s2, t, y, temperature=T, ce_weight=w)
        out_c.backward()
        out_e.backward()
        torch.testing.assert_close(out_c, out_e)
        torch.testing.assert_close(s1.grad, s2.grad)
    with pytest.raises(Exception, match="temperature must be finite and > 0"):
        compiled(s, t, y, -1.0, 0.1)
    dynamic = torch.compile(lambda s, t, y: kf.kd_loss(s, t, y, ce_weight=0.1), fullgraph=True, dynamic=True,
                            backend="aot_eager")
    torch.testing.assert_close(dynamic(s, t, y), kf.kd_loss(s, t, y, ce_weight=0.1))


def test_numpy_scalars_are_accepted():
    s, t, y = make_logits(4, 10), make_logits(4, 10, seed=1), make_labels(4, 10)
    y = y.masked_fill(torch.tensor([True, False, False, False]), 7)
    expected = kf.kd_loss(s, t, y, temperature=2.0, kd_weight=0.5, ce_weight=0.25, ignore_index=7)
    got = kf.kd_loss(s, t, y, temperature=np.float32(2.0), kd_weight=np.float64(0.5), ce_weight=np.float16(0.25),
                     ignore_index=np.int64(7))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    crit = kf.KDLoss(temperature=np.float32(2.0), ignore_index=np.int32(7))
    assert type(crit.ignore_index) is int and type(crit.temperature) is float
    assert "ignore_index=7" in repr(crit) and "validate=True" in repr(crit)


def test_small_integer_labels_are_checked_as_int64():
    # In its own dtype a uint8 label would meet C = 300 as 44: 200 is a valid class here.
    s, t = make_logits(4, 300), make_logits(4, 300, seed=1)
    y8 = torch.tensor([200, 0, 255, 5], dtype=torch.uint8)
    torch.testing.assert_close(kf.kd_loss(s, t, y8, ce_weight=0.1), kf.kd_loss(s, t, y8.long(), ce_weight=0.1))
    assert torch.isfinite(kf.instance_scores(s, y8, t)).all()


def test_double_backward_raises_instead_of_dropping_the_penalty():
    # The gradient the op returns has no derivative of its own. Under create_graph=True it can be
    # taken (same values), but a gradient penalty built on it must raise, not silently add nothing.
    lin = torch.nn.Linear(6, 10).double()
    x, t = torch.randn(4, 6, dtype=torch.float64), make_logits(4, 10, dtype=torch.float64, seed=1)
    y = make_labels(4, 10)
    s = lin(x)
    loss = kf.kd_loss(s, t, y, ce_weight=0.5)
    (g,) = torch.autograd.grad(loss, s, create_graph=True)
    assert g.requires_grad
    torch.testing.assert_close(g.detach(), torch.autograd.grad(kf.kd_loss(s, t, y, ce_weight=0.5), s)[0])
    (plain,) = torch.autograd.grad(kf.kd_loss(lin(x), t, y, ce_weight=0.5), lin.weight)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(loss + (g ** 2).sum(), lin.weight)
    with pytest.raises(RuntimeError, match="no double backward"):
        (loss + (g ** 2).sum()).backward()
    # create_graph=True on the parameters (a caller that needs the graph for another term) still
    # gives the first-order gradient.
    (gw,) = torch.autograd.grad(kf.kd_loss(lin(x), t, y, ce_weight=0.5), lin.weight, create_graph=True)
    torch.testing.assert_close(gw.detach(), plain)
    s64 = make_logits(3, 5, dtype=torch.float64).requires_grad_()
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.gradgradcheck(lambda a: kf.kd_loss(a, t[:3, :5]), (s64,))


def test_vmap_without_autograd_validates_nothing_it_cannot_read():
    # Under vmap the label values cannot be read: validate=True skips the check (as under
    # torch.compile) instead of failing in a boolean mask.
    s, t, y = make_logits(3 * 4, 10).view(3, 4, 10), make_logits(3 * 4, 10, seed=1).view(3, 4, 10), \
        make_labels(12, 10).view(3, 4)
    got = torch.vmap(lambda a, b, c: kf.instance_scores(a, c, b))(s, t, y)
    torch.testing.assert_close(got, torch.stack([kf.instance_scores(s[i], y[i], t[i]) for i in range(3)]))
    with torch.no_grad():
        rows = torch.vmap(lambda a, b, c: kf.kd_loss(a, b, c, ce_weight=0.1))(s, t, y)
    torch.testing.assert_close(rows, torch.stack([kf.kd_loss(s[i], t[i], y[i], ce_weight=0.1) for i in range(3)]))


def test_opcheck_dispatcher_registration():
    s, t, y = make_logits(6, 12).requires_grad_(), make_logits(6, 12, seed=2), make_labels(6, 12)
    torch.library.opcheck(torch.ops.kdseq.kd_loss.default, (s, t, y, 4.0, 0.9, 0.1, 1, -100, True),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_autocast_cpu_bf16():
    lin = torch.nn.Linear(16, 10)
    x = torch.randn(8, 16)
    t = torch.randn(8, 10)
    y = make_labels(8, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = lin(x)
        assert s.dtype == torch.bfloat16
        loss = kf.kd_loss(s, t, y, kd_weight=0.9, ce_weight=0.1)
    assert loss.dtype == torch.float32
    loss.backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    assert_close(loss, kf.kd_loss_reference(s, t, y, kd_weight=0.9, ce_weight=0.1), LOSS_TOL[torch.bfloat16],
                 "autocast")


# ----------------------------------------------------------------------------------------------
# GPU kernel (run automatically where CUDA exists)
# ----------------------------------------------------------------------------------------------
@pytest.mark.cuda
def test_cuda_matches_reference_shapes_dtypes():
    check_shapes_dtypes("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_cuda_non_contiguous_scalar_path(layout):
    s = make_logits(24, 2051, layout=layout, seed=1, device="cuda")
    t = make_logits(24, 2051, layout=layout, seed=2, device="cuda")
    run_and_compare(s, t, make_labels(24, 2051, device="cuda"), temperature=3.0, kd_weight=0.9, ce_weight=0.1,
                    what=f"cuda {layout}")


@pytest.mark.cuda
@pytest.mark.parametrize("s_dtype,t_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.bfloat16)])
def test_cuda_mixed_dtypes(s_dtype, t_dtype):
    for C in (100, 5000):
        s = make_logits(16, C, dtype=s_dtype, device="cuda")
        t = make_logits(16, C, dtype=t_dtype, device="cuda", seed=5)
        run_and_compare(s, t, make_labels(16, C, device="cuda"), temperature=2.0, kd_weight=0.9, ce_weight=0.1,
                        what="cuda mixed")


@pytest.mark.cuda
def test_cuda_edge_cases():
    dev = "cuda"
    for C in (262_144, 131_072 + 3):
        s, t = make_logits(2, C, device=dev, seed=1), make_logits(2, C, device=dev, seed=2)
        run_and_compare(s, t, torch.tensor([0, C - 1], device=dev), temperature=1.5, kd_weight=0.9,
                        ce_weight=0.1, what=f"cuda C={C}")
    s = make_logits(8, 1000, scale=4e3, device=dev).clamp(-1e4, 1e4)
    t = make_logits(8, 1000, scale=4e3, seed=8, device=dev).clamp(-1e4, 1e4)
    run_and_compare(s, t, make_labels(8, 1000, device=dev), temperature=0.5, kd_weight=0.9, ce_weight=0.1,
                    what="cuda extreme")
    mask = torch.zeros(6, 3000, dtype=torch.bool, device=dev)
    mask[:, 2000:] = True
    s = make_logits(6, 3000, device=dev).masked_fill(mask, float("-inf"))
    t = make_logits(6, 3000, device=dev, seed=3).masked_fill(mask, float("-inf"))
    loss, grad = run_and_compare(s, t, make_labels(6, 2000, device=dev), kd_weight=0.9, ce_weight=0.1,
                                 reduction="none", what="cuda masked")
    assert (grad[mask] == 0).all()
    y = torch.full((6,), -100, device=dev)
    sg = make_logits(6, 3000, device=dev).requires_grad_()
    loss = kf.kd_loss(sg, t.masked_fill(mask, 0.0), y, ce_weight=0.1)
    loss.backward()
    assert loss.item() == 0.0 and (sg.grad == 0).all()


@pytest.mark.cuda
def test_cuda_gradcheck_and_compile():
    s = make_logits(5, 7, dtype=torch.float64, device="cuda").requires_grad_()
    t = make_logits(5, 7, dtype=torch.float64, device="cuda", seed=4)
    y = torch.tensor([0, 3, -100, 6, 2], device="cuda")
    for reduction in ("mean", "sum", "none"):  # "none": a per-row grad_output, not one scalar
        assert torch.autograd.gradcheck(
            lambda x: kf.kd_loss(x, t, y, temperature=2.5, kd_weight=0.7, ce_weight=0.3, reduction=reduction),
            (s,), eps=1e-6, atol=1e-7)
    compiled = torch.compile(lambda a, b, c: kf.kd_loss(a, b, c, ce_weight=0.1), fullgraph=True)
    s32, t32 = make_logits(64, 1000, device="cuda"), make_logits(64, 1000, device="cuda", seed=1)
    y32 = make_labels(64, 1000, device="cuda")
    torch.testing.assert_close(compiled(s32, t32, y32), kf.kd_loss(s32, t32, y32, ce_weight=0.1))


@pytest.mark.cuda
def test_cuda_autocast():
    lin = torch.nn.Linear(64, 100).cuda()
    x = torch.randn(32, 64, device="cuda")
    t = torch.randn(32, 100, device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        s = lin(x)
        loss = kf.kd_loss(s, t, make_labels(32, 100, device="cuda"), ce_weight=0.1)
    assert s.dtype == torch.float16 and loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(lin.weight.grad).all()
