"""Input generators and tolerances shared by the op tests (CPU and CUDA)."""
import torch

# Absolute/relative tolerances per input dtype for the loss (fp32 accumulation everywhere) and for
# the gradient, which is rounded to the student's dtype.
LOSS_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (5e-5, 5e-5), torch.bfloat16: (5e-5, 5e-5),
            torch.float64: (1e-10, 1e-10)}
GRAD_TOL = {torch.float32: (1e-6, 1e-4), torch.float16: (1e-5, 2e-3), torch.bfloat16: (1e-4, 1e-2),
            torch.float64: (1e-12, 1e-10)}


def make_logits(B, C, *, dtype=torch.float32, device="cpu", scale=3.0, seed=0, layout="contiguous"):
    """(B, C) logits in the requested layout: contiguous, transposed (column-major) or strided."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(B, C, generator=g, dtype=torch.float64) * scale).to(dtype=dtype, device=device)
    if layout == "contiguous":
        return base
    if layout == "transposed":
        return base.t().contiguous().t()
    if layout == "strided":
        x = torch.zeros(B, 2 * C + 1, dtype=dtype, device=device)
        x[:, 1:2 * C + 1:2] = base
        return x[:, 1:2 * C + 1:2]
    raise ValueError(layout)


def make_labels(B, C, *, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, C, (B,), generator=g).to(device)


def assert_close(actual, expected, tol, what=""):
    atol, rtol = tol
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    scale = e.abs().max().clamp_min(1.0) if e.numel() else torch.tensor(1.0)
    torch.testing.assert_close(a, e, atol=atol * float(scale), rtol=rtol, msg=lambda m: f"{what}: {m}")
