"""Shared pytest setup: `cuda` tests run where a GPU exists and are skipped elsewhere."""
import os

import pytest
import torch
from hypothesis import settings

# CI runs the same examples every time (no flaky red builds from a newly drawn case); locally
# hypothesis keeps exploring new ones.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# Keep test runs reproducible and quiet on small machines.
os.environ.setdefault("KDSEQ_QUIET", "1")
# Deterministic runs on a GPU need this before the process's first matmul (PyTorch reads it
# once): the `cuda` tests train non-deterministic runs before deterministic ones in one process.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@pytest.fixture(autouse=True)
def _fresh_global_torch_state():
    """Each test starts from the same global RNG and leaves the determinism switches as it found
    them: runs started in-process (setup_run) reseed and switch them, and a test that draws from
    the global generator would otherwise get values that depend on the tests before it."""
    saved = (torch.are_deterministic_algorithms_enabled(),
             torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.manual_seed(0)
    yield
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none found)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def cuda_device():
    return torch.device("cuda", torch.cuda.current_device())
