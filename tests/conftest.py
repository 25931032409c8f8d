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
