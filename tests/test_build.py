"""The extension is built, registered with the dispatcher, and reports how it was built."""
import os
import re
import shutil

import pytest
import torch

import kdseq_fast as kf

OPS = ("kd_loss", "instance_scores")


def nvcc_available():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return os.path.exists(os.path.join(home, "bin", "nvcc")) or shutil.which("nvcc") is not None


def test_build_info_fields():
    info = kf.build_info()
    assert info["version"] == kf.__version__
    assert info["torch"] == torch.__version__
    assert isinstance(info["cuda_compiled"], bool)
    assert isinstance(info["cuda_archs"], list)
    assert info["openmp"] is True  # CPU kernels parallelize rows with OpenMP
    if info["cuda_compiled"]:
        archs = info["cuda_archs"]
        # "8.0", "9.0a", "9.0+PTX", or torch's names ("Hopper"): what setup.py passed to the build.
        assert archs and all(re.fullmatch(r"(\d+\.\d+[af]?|[A-Za-z]+)(\+PTX)?", a) for a in archs), archs
        # setup.py builds for TORCH_CUDA_ARCH_LIST (the Makefile exports it for the build and the
        # tests alike, "8.0;9.0+PTX" by default); without it at test time there is nothing to compare.
        requested = os.environ.get("TORCH_CUDA_ARCH_LIST")
        if requested:
            assert archs == requested.replace(";", " ").split(), (
                f"the extension was built for {archs} but TORCH_CUDA_ARCH_LIST={requested!r}: rebuild it "
                "(pip install --no-build-isolation -e .)")


@pytest.mark.skipif(os.environ.get("KDSEQ_CUDA") == "0", reason="CUDA build disabled with KDSEQ_CUDA=0")
def test_cuda_kernels_compiled_where_toolkit_exists():
    if torch.version.cuda is None or not nvcc_available():
        pytest.skip("CPU-only torch or no nvcc: the CPU-only build is expected")
    assert kf.build_info()["cuda_compiled"] is True


@pytest.mark.parametrize("op", OPS)
def test_dispatcher_has_cpu_and_cuda_kernels(op):
    name = f"kdseq::{op}"
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    assert has_cuda == kf.build_info()["cuda_compiled"]
    # Fake (meta) kernels are registered from Python for torch.compile.
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "Meta") or \
        torch._library.simple_registry.singleton.find(name).fake_impl.kernel is not None


def test_schemas():
    assert "compute_grad" in str(torch.ops.kdseq.kd_loss.default._schema)
    assert "Tensor? teacher" in str(torch.ops.kdseq.instance_scores.default._schema)


def test_public_contract_names():
    for name in ("kd_loss", "KDLoss", "instance_scores", "SCORE_FIELDS", "build_info"):
        assert hasattr(kf, name)
