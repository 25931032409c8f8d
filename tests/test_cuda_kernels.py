"""The device-side contract of the ops: validate=False (no host read, NaN rows for bad labels),
every CUDA kernel layout against the float64 reference, no host synchronization, CUDA-graph capture,
backward without a second pass over B x C, launch counts and peak memory.

The CPU tests run everywhere; the `cuda` ones where a GPU exists. On machines without a GPU the same
kernel sources run under the CPU emulation of tests/test_cuda_emulation.py.
"""

import pytest
import torch

import kdseq_fast as kf
from _op_cases import GRAD_TOL, assert_close, make_labels, make_logits
from test_kd_loss import run_and_compare


# ----------------------------------------------------------------------------------------------
# validate=False on every device
# ----------------------------------------------------------------------------------------------
def check_unvalidated_labels(device):
    C = 300
    s = make_logits(5, C, device=device).requires_grad_()
    t = make_logits(5, C, seed=1, device=device)
    y = torch.tensor([3, C, -5, -100, 10**9], device=device)
    with pytest.raises(ValueError, match="labels"):
        kf.kd_loss(s, t, y, ce_weight=0.1)
    rows = kf.kd_loss(s, t, y, ce_weight=0.1, kd_weight=0.9, reduction="none", validate=False)
    assert torch.isnan(rows[[1, 2, 4]]).all() and torch.isfinite(rows[0]) and float(rows[3].detach()) == 0.0
    (g,) = torch.autograd.grad(rows.sum(), s)
    assert torch.isnan(g[[1, 2, 4]]).all() and torch.isfinite(g[0]).all() and (g[3] == 0).all()
    loss = kf.kd_loss(s, t, y, ce_weight=0.1, validate=False)
    assert torch.isnan(loss)
    # Valid labels: the same numbers with or without validation.
    good = make_labels(5, C, device=device)
    torch.testing.assert_close(kf.kd_loss(s, t, good, ce_weight=0.1, validate=False),
                               kf.kd_loss(s, t, good, ce_weight=0.1), rtol=0, atol=0)
    sc = kf.instance_scores(s.detach(), y, t, validate=False)
    assert torch.isnan(sc[[1, 2, 3, 4]]).all() and torch.isfinite(sc[0]).all()
    with pytest.raises(ValueError, match="labels"):
        kf.instance_scores(s.detach(), y, t)


def test_unvalidated_labels_cpu():
    check_unvalidated_labels("cpu")


def test_validate_flag_type_checked():
    s, t = make_logits(2, 5), make_logits(2, 5, seed=1)
    with pytest.raises(TypeError, match="validate"):
        kf.kd_loss(s, t, validate="no")
    with pytest.raises(TypeError, match="validate"):
        kf.KDLoss(validate=1)
    with pytest.raises(TypeError, match="validate"):
        kf.instance_scores(s, torch.tensor([0, 1]), validate=None)


def test_force_plan_hook_rejects_bad_specs():
    if not kf.build_info()["cuda_compiled"]:
        pytest.skip("the hook only configures the CUDA kernels")
    for bad in ("mode=fast", "group=7", "e=12", "cluster=17", "segments=0", "nonsense", "size=3",
                "prefer=split", "prefer=staged,mode=staged"):
        with pytest.raises(RuntimeError, match="_force_plan"):
            torch.ops.kdseq._force_plan(bad)
    for good in ("mode=staged", "mode=staged,cluster=4", "mode=twopass", "prefer=staged", "prefer=twopass", ""):
        torch.ops.kdseq._force_plan(good)
    # No CUDA call on this thread yet (a fresh thread, or a CPU-only machine): nothing to report.
    import threading
    seen = []
    thread = threading.Thread(target=lambda: seen.append(torch.ops.kdseq._last_plan()))
    thread.start()
    thread.join()
    assert seen == [""]


# ----------------------------------------------------------------------------------------------
# CUDA
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def forced_plan():
    """Set a CUDA kernel layout for the test's calls; always reset afterwards."""
    def force(spec):
        torch.ops.kdseq._force_plan(spec)
    yield force
    torch.ops.kdseq._force_plan("")


CUDA_LAYOUTS = [
    (40, 100, ""),                            # one launch for everything (a 2-CTA cluster on sm_90)
    (257, 100, ""),                           # one launch, an 8-CTA cluster sharing the rows
    (300, 100, "mode=single,group=8,e=16,cluster=5"),
    (300, 100, "mode=single,group=8,e=16,cluster=1"),
    (300, 100, "mode=warp,group=8,e=16"),
    (70, 500, "mode=warp,group=32,e=16"),
    (9, 1000, "mode=cta,e=8"),
    (4096, 1000, ""),
    (3, 5000, "mode=cluster,cluster=3,e=8"),
    (2, 30000, "mode=cluster,cluster=16,e=8"),
    (4, 32000, ""),
    (2, 131072 + 4, ""),                      # beyond one cluster: split
    (4, 5000, "mode=split,segments=3"),
    (4, 5001, "mode=twopass"),
    (64, 32000, "mode=twopass"),
    (3, 5000, "mode=staged,cluster=3"),       # row slices in shared memory, a cluster a row
    (5, 3000, "mode=staged,cluster=1"),       # a row a CTA
    (64, 32000, "mode=staged"),
    (2, 131072, "mode=staged,cluster=16"),
    (4, 5001, "mode=staged"),                 # rows not a whole number of 16 bytes: split
    (64, 32000, "prefer=staged"),             # the planner's long rows staged (bench_kd_loss --plans)
    (512, 9000, "prefer=twopass"),            # the planner's split rows (>= 2 x SMs with CE) in twopass
]


def forced_mode(C, plan):
    """The layout a forced or preferred plan must run on an sm_90 GPU (None: the planner chooses).
    The prefer= cases above are shapes where the planner holds long rows in a cluster or splits them."""
    key = plan.split("=")[0]
    if key not in ("mode", "prefer"):
        return None
    mode = plan.split(",")[0][len(key) + 1:]
    if mode == "staged" and C % 8:
        return "split"  # 16-bit rows not a whole number of 16 bytes: no 16-byte copies
    return mode


@pytest.mark.cuda
@pytest.mark.parametrize("B,C,plan", CUDA_LAYOUTS)
def test_cuda_every_layout(forced_plan, B, C, plan):
    forced_plan(plan)
    expect = forced_mode(C, plan) if torch.cuda.get_device_capability()[0] >= 9 else None
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        s = make_logits(B, C, dtype=dtype, device="cuda", seed=B + C)
        t = make_logits(B, C, dtype=dtype, device="cuda", seed=B * C)
        y = make_labels(B, C, device="cuda")
        y[B // 2] = -100
        for reduction in ("mean", "sum", "none"):
            run_and_compare(s, t, y, temperature=3.0, kd_weight=0.9, ce_weight=0.1, reduction=reduction,
                            what=f"cuda {plan or 'auto'} B={B} C={C} {dtype} {reduction}")
            # A forced layout that silently fell back would test the fallback, not the layout.
            ran = torch.ops.kdseq._last_plan()
            assert expect is None or ran.startswith(expect + ","), (plan, dtype, ran)
        run_and_compare(s, t, None, temperature=2.0, kd_weight=1.3, what=f"cuda {plan or 'auto'} no labels")


@pytest.mark.cuda
def test_cuda_build_covers_this_gpu():
    # The kernels run on this GPU (every other cuda test), so the rule targets_run_on applies must agree.
    kf.check_cuda_kernels(torch.device("cuda", torch.cuda.current_device()))
    info = kf.build_info()
    assert kf._extension.targets_run_on(torch.cuda.get_device_capability(), info["cuda_targets"]), info


@pytest.mark.cuda
def test_cuda_direct_op_calls_refuse_tensors_on_another_device():
    # The dispatcher runs the CUDA kernel when any argument is on the GPU; the C++ checks keep a
    # host pointer out of the kernels for callers that skip the Python wrapper.
    s, t = make_logits(4, 100, device="cuda"), make_logits(4, 100, seed=1, device="cuda")
    y = make_labels(4, 100)
    with pytest.raises(RuntimeError, match="labels is on cpu"):
        torch.ops.kdseq.kd_loss(s, t, y, 4.0, 1.0, 0.1, 1, -100, False)
    with pytest.raises(RuntimeError, match="teacher_logits is on cpu"):
        torch.ops.kdseq.kd_loss(s, t.cpu(), y.cuda(), 4.0, 1.0, 0.1, 1, -100, False)
    with pytest.raises(RuntimeError, match="labels is on cpu"):
        torch.ops.kdseq.instance_scores(s, y, t, 4.0)
    with pytest.raises(RuntimeError, match="teacher_logits is on cpu"):
        torch.ops.kdseq.instance_scores(s, y.cuda(), t.cpu(), 4.0)


@pytest.mark.cuda
def test_cuda_unvalidated_labels():
    check_unvalidated_labels("cuda")


@pytest.mark.cuda
@pytest.mark.parametrize("B,C", [(256, 100), (64, 1000), (8, 40000)])
def test_cuda_no_host_sync(B, C):
    s = make_logits(B, C, device="cuda").requires_grad_()
    t = make_logits(B, C, device="cuda", seed=1)
    y = make_labels(B, C, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for reduction in ("mean", "sum", "none"):
            loss = kf.kd_loss(s, t, y, ce_weight=0.1, kd_weight=0.9, reduction=reduction, validate=False)
            loss.sum().backward() if reduction == "none" else loss.backward()
            kf.instance_scores(s.detach(), y, t, validate=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(s.grad).all()


@pytest.mark.cuda
def test_cuda_graph_capture_forward_backward():
    B, C = 128, 1000
    lin = torch.nn.Linear(64, C).cuda()
    x = torch.randn(B, 64, device="cuda")
    t = make_logits(B, C, device="cuda", seed=2)
    y = make_labels(B, C, device="cuda")

    def step():
        lin.zero_grad(set_to_none=False)
        loss = kf.kd_loss(lin(x), t, y, ce_weight=0.1, kd_weight=0.9, validate=False)
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    eager_loss = step().detach().clone()
    eager_grad = lin.weight.grad.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(static_loss, eager_loss)
    torch.testing.assert_close(lin.weight.grad, eager_grad)


def _kernel_launches(fn):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and "kdseq" in e.name]


@pytest.mark.cuda
def test_cuda_small_shapes_launch_once_and_backward_does_not_touch_b_by_c():
    s = make_logits(256, 100, device="cuda").requires_grad_()
    t = make_logits(256, 100, device="cuda", seed=1)
    y = make_labels(256, 100, device="cuda")
    fwd = _kernel_launches(lambda: kf.kd_loss(s, t, y, ce_weight=0.1, validate=False))
    assert len([e for e in fwd if "kd_rows_kernel" in e.name]) == 1, [e.name for e in fwd]
    assert not [e for e in fwd if "prologue" in e.name or "split" in e.name]
    loss = kf.kd_loss(s, t, y, ce_weight=0.1, validate=False)
    bwd = _kernel_launches(lambda: loss.backward())
    assert len(bwd) <= 1, [e.name for e in bwd]   # one scale kernel that returns at once, or none


@pytest.mark.cuda
def test_cuda_backward_paths_agree():
    # The first backward scales the stored gradient in place; later backward passes of a retained
    # graph multiply out of place; every path gives the reference gradient.
    s0, t, y = (make_logits(16, 3000, seed=3, device="cuda"), make_logits(16, 3000, seed=4, device="cuda"),
                make_labels(16, 3000, device="cuda"))
    kw = dict(temperature=3.0, kd_weight=0.8, ce_weight=0.2)
    s64 = s0.double().requires_grad_()
    (ref,) = torch.autograd.grad(kf.kd_loss_reference(s64, t.double(), y, **kw), s64)
    s = s0.clone().requires_grad_()
    loss = kf.kd_loss(s, t, y, **kw)
    (g_half,) = torch.autograd.grad(loss, s, grad_outputs=torch.tensor(0.5, device="cuda"), retain_graph=True)
    kept = g_half.clone()
    (g_two,) = torch.autograd.grad(loss, s, grad_outputs=torch.tensor(2.0, device="cuda"), retain_graph=True)
    (g_one,) = torch.autograd.grad(loss, s, retain_graph=True)
    assert torch.equal(g_half, kept)  # handing out later results never touched the first one
    assert_close(g_half, 0.5 * ref, GRAD_TOL[torch.float32], "0.5")
    assert_close(g_two, 2.0 * ref, GRAD_TOL[torch.float32], "2.0")
    assert_close(g_one, ref, GRAD_TOL[torch.float32], "1.0")
    s = s0.clone().requires_grad_()
    loss = kf.kd_loss(s, t, y, **kw)
    for _ in range(3):
        loss.backward(retain_graph=True)
    assert_close(s.grad, 3 * ref, (1e-6, 1e-4), "three retained backward passes")
    rows = kf.kd_loss(s, t, y, reduction="none", **kw)
    w = torch.linspace(0.0, 2.0, 16, device="cuda")
    (g_rows,) = torch.autograd.grad((rows * w).sum(), s)
    (g_sum,) = torch.autograd.grad(kf.kd_loss(s, t, y, reduction="sum", **kw), s)
    assert_close(g_rows, g_sum * w[:, None], (1e-7, 1e-5), "reduction='none' weighted")
    (g_graph,) = torch.autograd.grad(kf.kd_loss(s, t, y, **kw), s, create_graph=True)
    assert_close(g_graph, ref, GRAD_TOL[torch.float32], "create_graph")
    # Backward passes of a retained graph, each with a grad_output of its own, agree; a first
    # grad_output changed in place afterwards (what gradcheck does with its one buffer) makes every
    # later backward an error, not a gradient scaled by a stale ratio.
    rows = kf.kd_loss(s, t, y, reduction="none", **kw)
    g = torch.ones(rows.shape, device="cuda")
    (first,) = torch.autograd.grad(rows, s, g, retain_graph=True)
    (again,) = torch.autograd.grad(rows, s, torch.full(rows.shape, 2.0, device="cuda"), retain_graph=True)
    assert_close(again, 2.0 * first, (1e-7, 1e-5), "a second grad_output of its own")
    g.mul_(2.0)
    for later in (g, torch.full(rows.shape, 2.0, device="cuda")):
        with pytest.raises(RuntimeError, match="modified in place afterwards"):
            torch.autograd.grad(rows, s, later, retain_graph=True)


@pytest.mark.cuda
def test_cuda_peak_memory_one_gradient():
    B, C = 1024, 32000
    s = make_logits(B, C, device="cuda").requires_grad_()
    t = make_logits(B, C, device="cuda", seed=1)
    y = make_labels(B, C, device="cuda")
    kf.kd_loss(s, t, y, ce_weight=0.1, validate=False).backward()  # warm the caching allocator
    s.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = kf.kd_loss(s, t, y, ce_weight=0.1, validate=False)
    (g,) = torch.autograd.grad(loss, s)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    # One B x C gradient plus small per-row buffers (row losses, workspace; the caching allocator
    # rounds them up): measured 1.03 MiB over the gradient on an H200. A second B x C buffer (the
    # old backward's separate multiply) would double it.
    grad_bytes = B * C * s.element_size()
    assert extra <= grad_bytes + (4 << 20), (extra, grad_bytes)


@pytest.mark.cuda
def test_cuda_instance_scores_layouts():
    from test_instance_scores import compare

    for B, C in [(3, 2), (50, 100), (40, 1000), (4, 5000), (2, 131072)]:
        for dtype in (torch.float32, torch.bfloat16):
            s = make_logits(B, C, dtype=dtype, device="cuda", seed=C)
            t = make_logits(B, C, dtype=dtype, device="cuda", seed=C + 1)
            compare(s, make_labels(B, C, device="cuda"), t, what=f"cuda scores {B}x{C} {dtype}")
