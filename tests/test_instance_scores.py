"""instance_scores against the float64 reference (six separate PyTorch reductions)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kdseq_fast as kf
from _op_cases import make_labels, make_logits

# Score tolerance per input dtype (fp32 accumulation; inputs compared on identical values).
TOL = {torch.float32: 3e-5, torch.float16: 5e-5, torch.bfloat16: 5e-5, torch.float64: 1e-10}


def kd_abs_error_bound(T, C, dtype):
    """The kd column comes from one pass (T^2 * (u/Z_t - log Z_t + log Z_s)): its absolute error is a
    few fp32 ulps of the log-partition terms, scaled by T^2 -- independent of how small KL is."""
    if dtype == torch.float64:
        return 0.0
    return 8 * T * T * 1.2e-7 * (1.0 + math.log(C))


def compare(s, y, t=None, *, T=4.0, what=""):
    out = kf.instance_scores(s, y, t, temperature=T)
    assert out.shape == (s.shape[0], 6)
    assert out.dtype == (torch.float64 if s.dtype == torch.float64 else torch.float32)
    ref = kf.instance_scores_reference(s, y, t, temperature=T)
    out64 = out.double().cpu()
    ref = ref.cpu()
    for j, name in enumerate(kf.SCORE_FIELDS):
        scale = max(1.0, float(ref[:, j].abs().max())) if ref.numel() else 1.0
        atol = TOL[s.dtype] * scale
        if name == "kd" and t is not None:
            atol += kd_abs_error_bound(T, s.shape[1], s.dtype)
        torch.testing.assert_close(out64[:, j], ref[:, j], atol=atol, rtol=TOL[s.dtype],
                                   msg=lambda m: f"{what} column {name}: {m}")
    return out


def check_all(device):
    for B, C in [(1, 2), (7, 3), (64, 10), (100, 100), (33, 1000), (9, 1025), (4, 5003), (2, 32000)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            s = make_logits(B, C, dtype=dtype, device=device, seed=B + C)
            t = make_logits(B, C, dtype=dtype, device=device, seed=2 * B + C)
            y = make_labels(B, C, device=device)
            compare(s, y, t, what=f"{device} {B}x{C} {dtype}")
            compare(s, y, None, what=f"{device} {B}x{C} {dtype} no teacher")


def test_score_fields_contract():
    assert kf.SCORE_FIELDS == ("ce", "kd", "p_true", "margin", "entropy", "correct")


def test_matches_reference_every_column_and_dtype():
    check_all("cpu")


def test_kd_column_is_zero_without_teacher_and_matches_kd_loss_with_one():
    s, t, y = make_logits(20, 50), make_logits(20, 50, seed=3), make_labels(20, 50)
    assert (kf.instance_scores(s, y)[:, 1] == 0).all()
    kd_col = kf.instance_scores(s, y, t, temperature=3.0)[:, 1]
    per_row = kf.kd_loss(s, t, temperature=3.0, reduction="none")
    torch.testing.assert_close(kd_col, per_row, rtol=1e-4, atol=1e-5)


def test_ties_first_maximum_wins():
    # Row 0: label is the first of two tied maxima -> correct; row 1: label is the second -> wrong.
    s = torch.tensor([[1.0, 5.0, 5.0, 0.0], [1.0, 5.0, 5.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    y = torch.tensor([1, 2, 0])
    out = compare(s, y, what="ties")
    assert out[:, 5].tolist() == [1.0, 0.0, 1.0]
    assert out[:, 3].tolist() == [0.0, 0.0, 0.0]  # margin against the tied runner-up is 0
    # Ties across chunk boundaries (CPU chunks of 256 elements) and long rows.
    C = 5000
    s = torch.zeros(3, C)
    s[:, [300, 4000]] = 7.0
    y = torch.tensor([300, 4000, 0])
    out = compare(s, y, what="long ties")
    assert out[:, 5].tolist() == [1.0, 0.0, 0.0]


def test_correct_is_the_first_maximum_among_non_nan_entries_in_the_reference_too():
    # All NaN: no maximum, not correct whatever the label; NaN then -inf: the first -inf is it.
    nan, inf = float("nan"), float("inf")
    s = torch.tensor([[nan, nan, nan], [nan, -inf, -inf], [nan, -inf, -inf]])
    y = torch.tensor([0, 1, 2])
    for out in (kf.instance_scores(s, y), kf.instance_scores_reference(s, y)):
        assert out[:, kf.SCORE_FIELDS.index("correct")].tolist() == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_non_finite_rows_follow_the_documented_rules_worked_by_hand(dtype):
    # README: on a row holding NaN or +inf, ce, p_true, entropy and kd are NaN; the maxima behind
    # margin and correct skip NaN entries. Expected values worked out by hand, not by a reference.
    nan, inf = float("nan"), float("inf")
    s = torch.tensor([[nan, 1.0, 3.0],     # y = 2: margin 3 - 1 = 2, argmax over {1, 3} is y
                      [1.0, nan, 3.0],     # y = 1 (the NaN): margin NaN, argmax is class 2
                      [nan, nan, nan],     # nothing to compare: margin NaN, not correct
                      [inf, 1.0, 3.0],     # y = 2: margin 3 - inf, argmax is the +inf class
                      [-inf, 1.0, 3.0]], dtype=dtype)  # y = 0, masked: ce = +inf; the teacher's
    # uniform row gives the masked class 1/3, so the KL (kd) is +inf too
    y = torch.tensor([2, 1, 1, 2, 0])
    t = torch.zeros(5, 3, dtype=dtype)
    nan_cols = [kf.SCORE_FIELDS.index(f) for f in ("ce", "kd", "p_true", "entropy")]
    for out in (kf.instance_scores(s, y, t), kf.instance_scores_reference(s, y, t).to(torch.float32)):
        col = {f: out[:, kf.SCORE_FIELDS.index(f)] for f in kf.SCORE_FIELDS}
        assert torch.isnan(out[:4, nan_cols]).all()
        assert col["margin"][0] == 2.0 and col["correct"][0] == 1.0
        assert torch.isnan(col["margin"][1]) and col["correct"][1] == 0.0
        assert torch.isnan(col["margin"][2]) and col["correct"][2] == 0.0
        assert col["margin"][3] == -inf and col["correct"][3] == 0.0
        assert col["ce"][4] == inf and col["p_true"][4] == 0.0 and col["margin"][4] == -inf
        assert col["correct"][4] == 0.0 and torch.isfinite(col["entropy"][4]) and col["kd"][4] == inf


def test_masked_classes_and_extreme_values():
    s, t = make_logits(6, 600, seed=1), make_logits(6, 600, seed=2)
    s[:, 500:] = float("-inf")
    t[:, 500:] = float("-inf")
    y = make_labels(6, 500)
    out = compare(s, y, t, what="masked")
    assert torch.isfinite(out).all()
    big = make_logits(5, 1000, scale=4e3, seed=3).clamp(-1e4, 1e4)
    bigt = make_logits(5, 1000, scale=4e3, seed=4).clamp(-1e4, 1e4)
    compare(big, make_labels(5, 1000), bigt, T=0.5, what="extreme")


@pytest.mark.parametrize("T", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.float16, torch.float16), (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16", "fp16", "bf16-fp32"])
def test_power_of_two_temperatures_match_the_general_loop(T, dtypes):
    """At T = 1, 2, 4 the CPU takes exp(s - m) from exp((s - m) / T) (row_math.h, exp_from_tempered).
    The next double above T is the same fp32 temperature but takes the general loop: the two agree to
    a few ulp, with the same NaN and inf entries, and match the fp64 reference on finite rows. The
    rows cover spread logits (exp(s - m) crosses the -87 cut to 0), masked classes and NaNs."""
    B, C = 40, 1000
    s = make_logits(B, C, dtype=dtypes[0], scale=5.0, seed=11)
    t = make_logits(B, C, dtype=dtypes[1], scale=5.0, seed=12)
    y = make_labels(B, C, seed=13)
    s[0] = torch.linspace(-300.0, 0.0, C).to(dtypes[0])
    t[1] = torch.linspace(0.0, -400.0, C).to(dtypes[1])
    s[2, 600:] = float("-inf")
    t[2, 600:] = float("-inf")
    y[2] = 5
    s[3, 500:] = float("-inf")  # teacher mass where the student has none: inf KL
    y[3] = 7
    s[4, 17] = float("nan")
    t[5, 900] = float("nan")
    tempered = kf.instance_scores(s, y, t, temperature=T)
    general = kf.instance_scores(s, y, t, temperature=math.nextafter(T, math.inf))
    assert torch.equal(tempered.isnan(), general.isnan())
    assert torch.equal(tempered.isinf(), general.isinf())
    assert tempered.isnan().any() and tempered.isinf().any()
    finite = tempered.isfinite()
    torch.testing.assert_close(tempered[finite], general[finite], rtol=2e-6, atol=2e-6)
    ok = torch.ones(B, dtype=torch.bool)
    ok[3:6] = False
    compare(s[ok], y[ok], t[ok], T=T, what=f"T={T} {dtypes}")


@pytest.mark.parametrize("layout", ["transposed", "strided"])
def test_non_contiguous(layout):
    s = make_logits(17, 1234, layout=layout)
    t = make_logits(17, 1234, layout=layout, seed=9)
    compare(s, make_labels(17, 1234), t, what=layout)


def test_long_rows_split_across_threads():
    s, t = make_logits(1, 262_144, seed=5), make_logits(1, 262_144, seed=6)
    compare(s, torch.tensor([12345]), t, T=2.0, what="262144")


def test_double_inputs():
    s, t = make_logits(10, 30, dtype=torch.float64), make_logits(10, 30, dtype=torch.float64, seed=1)
    compare(s, make_labels(10, 30), t, what="float64")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(B=st.integers(1, 50), C=st.integers(2, 2500), T=st.floats(0.5, 20.0),
       scale=st.sampled_from([0.01, 1.0, 20.0, 300.0]), with_teacher=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 10_000))
def test_hypothesis_random_problems(B, C, T, scale, with_teacher, dtype, seed):
    s = make_logits(B, C, dtype=dtype, scale=scale, seed=seed)
    t = make_logits(B, C, dtype=dtype, scale=scale, seed=seed + 1) if with_teacher else None
    compare(s, make_labels(B, C, seed=seed + 2), t, T=T, what="hypothesis")


@pytest.mark.parametrize("call,exc,match", [
    (lambda s, y, t: kf.instance_scores(s[0], y), ValueError, "student_logits"),
    (lambda s, y, t: kf.instance_scores(s, y[:2]), ValueError, "labels"),
    (lambda s, y, t: kf.instance_scores(s, y + 10), ValueError, "labels"),
    (lambda s, y, t: kf.instance_scores(s, y - 10), ValueError, "labels"),
    (lambda s, y, t: kf.instance_scores(s, y.float()), TypeError, "labels"),
    (lambda s, y, t: kf.instance_scores(s, None), TypeError, "labels"),
    (lambda s, y, t: kf.instance_scores(s, y, t[:, :3]), ValueError, "teacher_logits"),
    (lambda s, y, t: kf.instance_scores(s, y, t[:2]), ValueError, "batch size"),
    (lambda s, y, t: kf.instance_scores(s, y, t, temperature=0), ValueError, "temperature"),
    (lambda s, y, t: kf.instance_scores(s.int(), y), TypeError, "student_logits"),
    (lambda s, y, t: kf.instance_scores(s, y, t.to("meta")), ValueError, "teacher_logits"),
])
def test_bad_input(call, exc, match):
    s, y, t = make_logits(4, 10), make_labels(4, 10), make_logits(4, 10, seed=1)
    with pytest.raises(exc, match=match):
        call(s, y, t)


def test_torch_compile_and_opcheck():
    s, y, t = make_logits(8, 40), make_labels(8, 40), make_logits(8, 40, seed=1)
    f = torch.compile(lambda a, b, c: kf.instance_scores(a, b, c).sum(0), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(s, y, t), kf.instance_scores(s, y, t).sum(0))
    torch.library.opcheck(torch.ops.kdseq.instance_scores.default, (s, y, t, 4.0),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.cuda
def test_cuda_matches_reference():
    check_all("cuda")


@pytest.mark.cuda
def test_cuda_edge_cases():
    dev = "cuda"
    for layout in ("transposed", "strided"):
        s = make_logits(17, 2001, layout=layout, device=dev)
        t = make_logits(17, 2001, layout=layout, device=dev, seed=9)
        compare(s, make_labels(17, 2001, device=dev), t, what=f"cuda {layout}")
    s = torch.zeros(3, 5000, device=dev)
    s[:, [300, 4000]] = 7.0
    out = compare(s, torch.tensor([300, 4000, 0], device=dev), what="cuda ties")
    assert out[:, 5].tolist() == [1.0, 0.0, 0.0]
    s = torch.tensor([[1.0, 5.0, 5.0, 0.0], [1.0, 5.0, 5.0, 0.0]], device=dev)
    assert compare(s, torch.tensor([1, 2], device=dev), what="cuda small ties")[:, 5].tolist() == [1.0, 0.0]
    s, t = make_logits(2, 262_144, device=dev), make_logits(2, 262_144, device=dev, seed=3)
    compare(s, torch.tensor([0, 262_143], device=dev), t, T=2.0, what="cuda 262144")
    for s_dtype, t_dtype in [(torch.float32, torch.bfloat16), (torch.float16, torch.float32)]:
        s = make_logits(16, 3000, dtype=s_dtype, device=dev)
        t = make_logits(16, 3000, dtype=t_dtype, device=dev, seed=3)
        compare(s, make_labels(16, 3000, device=dev), t, what="cuda mixed")
