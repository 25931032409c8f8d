"""Fuzzing the ops' arguments: every call either computes the reference value or raises
ValueError/TypeError -- it never crashes the process or silently returns garbage."""
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import kdseq_fast as kf

FLOATS = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
ANY_DTYPE = FLOATS + [torch.int64, torch.int32, torch.uint8, torch.bool]


@st.composite
def logits(draw, name):
    rank = draw(st.sampled_from([2, 2, 2, 1, 3]))
    B = draw(st.integers(0, 6))
    C = draw(st.integers(0, 40))
    shape = {1: (C,), 2: (B, C), 3: (B, C, 2)}[rank]
    dtype = draw(st.sampled_from(ANY_DTYPE))
    x = torch.randn(shape) * draw(st.sampled_from([0.1, 3.0, 100.0]))
    if draw(st.booleans()) and x.numel():
        x.view(-1)[0] = draw(st.sampled_from([float("inf"), float("-inf"), float("nan")]))
    if draw(st.booleans()) and rank == 2 and C > 1:
        x = x[:, ::2] if draw(st.booleans()) else x.t().contiguous().t()
    return x.to(dtype) if dtype != torch.bool else x > 0


@st.composite
def labels(draw):
    kind = draw(st.sampled_from(["ok", "ok", "none", "float", "short", "range", "2d", "list"]))
    B = draw(st.integers(0, 6))
    C = draw(st.integers(1, 40))
    if kind == "none":
        return None
    if kind == "float":
        return torch.zeros(B)
    if kind == "2d":
        return torch.zeros(B, 1, dtype=torch.long)
    if kind == "list":
        return [0] * B
    hi = C + (5 if kind == "range" else 0)
    y = torch.randint(-1 if kind == "range" else 0, max(hi, 1), (B,))
    if kind == "short":
        y = y.int()
    return y


def number():
    return st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 30),
                     st.sampled_from([None, "4", True]))


def _finite_inputs(*ts):
    return all(t is None or not t.dtype.is_floating_point or bool(torch.isfinite(t.float()).all()) for t in ts)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(s=logits("s"), t=logits("t"), y=labels(), T=number(), kdw=number(), cew=number(),
       reduction=st.sampled_from(["mean", "sum", "none", "avg", None]))
def test_kd_loss_fuzz(s, t, y, T, kdw, cew, reduction):
    kw = dict(temperature=T, kd_weight=kdw, ce_weight=cew, reduction=reduction)
    try:
        out = kf.kd_loss(s, t, y, **kw)
    except (ValueError, TypeError):
        return
    # Accepted: the arguments were valid, so the value must match the reference.
    assert s.dtype in FLOATS and t.dtype in FLOATS and s.dim() == 2 and s.shape == t.shape
    assert isinstance(T, (int, float)) and not isinstance(T, bool) and math.isfinite(T) and T > 0
    ref = kf.kd_loss_reference(s, t, y, **kw)
    if _finite_inputs(s, t):
        tol = 1e-2 if s.dtype in (torch.float16, torch.bfloat16) or t.dtype in (torch.float16, torch.bfloat16) else 1e-4
        torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=tol * max(1.0, float(ref.abs().max()) if ref.numel() else 1.0))
    else:
        # Non-finite inputs: the op may not invent a finite value where the reference has none.
        assert out.shape == ref.shape


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(s=logits("s"), t=st.one_of(st.none(), logits("t")), y=labels(), T=number())
def test_instance_scores_fuzz(s, t, y, T):
    try:
        out = kf.instance_scores(s, y, t, temperature=T)
    except (ValueError, TypeError):
        return
    assert s.dtype in FLOATS and s.dim() == 2 and out.shape == (s.shape[0], 6)
    ref = kf.instance_scores_reference(s, y, t, temperature=T)
    if _finite_inputs(s, t):
        tol = 1e-2 if s.dtype in (torch.float16, torch.bfloat16) or (t is not None and t.dtype in (torch.float16, torch.bfloat16)) else 1e-4
        scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
        atol = torch.full((6,), tol * scale, dtype=torch.float64)
        # kd column: one-pass log-partition difference, absolute error ~ T^2 * fp32 ulps * log C.
        atol[1] += 8 * min(float(T), 1e150) ** 2 * 1.2e-7 * (1.0 + math.log(max(s.shape[1], 2)))
        err = (out.double() - ref.double()).abs()
        assert (err <= atol + tol * ref.double().abs()).all(), f"max error per column {err.max(0).values}"
