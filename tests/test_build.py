"""The extension is built, registered with the dispatcher, and reports how it was built."""
import os
import re
import shutil

import pytest
import torch

import kdseq_fast as kf
from kdseq_fast import _extension

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


def test_cuda_targets_are_what_the_arch_list_compiles():
    info = kf.build_info()
    targets = info["cuda_targets"]
    assert bool(targets) == info["cuda_compiled"]
    for arch in info["cuda_archs"]:
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", arch)
        if m is None:
            continue  # a name such as "Hopper": torch expands it at build time
        code = m.group(1) + m.group(2) + m.group(3)
        assert f"sm_{code}" in targets, (arch, targets)
        assert (f"compute_{code}" in targets) == bool(m.group(4)), (arch, targets)


@pytest.mark.parametrize("capability, targets, runs", [
    # The default build, "8.0;9.0+PTX": A100, A10/L4/RTX (8.6, 8.9), H100, and newer GPUs via PTX.
    ((8, 0), ["sm_80", "compute_90", "sm_90"], True),
    ((8, 6), ["sm_80", "compute_90", "sm_90"], True),
    ((8, 9), ["sm_80", "compute_90", "sm_90"], True),
    ((9, 0), ["sm_80", "compute_90", "sm_90"], True),
    ((10, 0), ["sm_80", "compute_90", "sm_90"], True),
    ((12, 0), ["sm_80", "compute_90", "sm_90"], True),
    ((7, 5), ["sm_80", "compute_90", "sm_90"], False),   # T4: machine code runs only forward in its major
    ((7, 0), ["sm_80", "compute_90", "sm_90"], False),
    ((9, 0), ["sm_80"], False),                           # no PTX: nothing for a newer major
    ((8, 0), ["sm_86"], False),                           # nor for an older minor
    ((8, 0), ["compute_86"], False),
    ((9, 0), ["sm_90a"], True),                           # arch-specific: exactly that GPU
    ((10, 0), ["sm_90a", "compute_90a"], False),
    ((10, 3), ["sm_100f"], True),                         # family: within its major
    ((12, 0), ["sm_100f"], False),
    ((7, 5), ["sm_75"], True),
    ((7, 5), [], False),
    ((7, 5), ["gfx90a"], True),                           # unreadable names never block a run
])
def test_targets_run_on(capability, targets, runs):
    assert _extension.targets_run_on(capability, targets) is runs


@pytest.fixture
def fake_gpu(monkeypatch):
    """cuda:0 reports the given capability and name; build_info() the given fields."""
    def install(capability, name="Tesla T4", **info):
        real = _extension.build_info()
        monkeypatch.setattr(_extension, "build_info", lambda: {**real, **info})
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: name)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        _extension._kernels_problem.cache_clear()
    yield install
    _extension._kernels_problem.cache_clear()


def test_check_cuda_kernels_names_the_gpu_and_the_rebuild(fake_gpu):
    fake_gpu((7, 5), cuda_compiled=True, cuda_archs=["8.0", "9.0+PTX"],
             cuda_targets=["sm_80", "compute_90", "sm_90"])
    with pytest.raises(RuntimeError) as err:
        kf.check_cuda_kernels("cuda:0")
    msg = str(err.value)
    assert "Tesla T4" in msg and "compute capability 7.5" in msg
    assert 'TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"' in msg and 'TORCH_CUDA_ARCH_LIST="7.5"' in msg
    assert "pip install --no-build-isolation" in msg and "'cpu'" in msg


def test_check_cuda_kernels_passes_a_covered_gpu_and_any_cpu(fake_gpu):
    fake_gpu((9, 0), name="NVIDIA H200", cuda_compiled=True, cuda_targets=["sm_80", "compute_90", "sm_90"])
    kf.check_cuda_kernels(torch.device("cuda", 0))
    kf.check_cuda_kernels("cpu")
    # A build that did not record its targets is not second-guessed.
    fake_gpu((7, 5), cuda_compiled=True, cuda_targets=[])
    kf.check_cuda_kernels("cuda:0")


def test_check_cuda_kernels_without_that_gpu(monkeypatch):
    # Without a GPU it raised torch's bare "Found no NVIDIA driver", naming neither device nor fix.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(_extension.CudaKernelsUnavailable, match=r"no CUDA device is available.*cuda:0.*'cpu'"):
        kf.check_cuda_kernels("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(_extension.CudaKernelsUnavailable, match=r"cuda:2 does not exist: this process sees 2 GPU"):
        kf.check_cuda_kernels("cuda:2")


def test_check_cuda_kernels_without_cuda_kernels(fake_gpu):
    fake_gpu((9, 0), name="NVIDIA H100", cuda_compiled=False, cuda_archs=[], cuda_targets=[])
    with pytest.raises(RuntimeError, match=r"built without its CUDA kernels.*cuda:0 \(NVIDIA H100\)"):
        kf.check_cuda_kernels("cuda:0")


def test_check_cuda_kernels_says_why_the_build_left_them_out(fake_gpu):
    fake_gpu((9, 0), name="NVIDIA H100", cuda_compiled=False, cuda_archs=[], cuda_targets=[],
             cuda_off_reasons=[_extension.CUDA_OFF_REASONS["env_off"]])
    with pytest.raises(RuntimeError, match=r"CUDA kernels \(KDSEQ_CUDA=0 was set\).*without KDSEQ_CUDA=0"):
        kf.check_cuda_kernels("cuda:0")
    fake_gpu((9, 0), cuda_compiled=False, cuda_off_reasons=[_extension.CUDA_OFF_REASONS["nvcc_mismatch"]])
    with pytest.raises(RuntimeError, match=r"\(nvcc's CUDA major version did not match torch's\).*whose major"):
        kf.check_cuda_kernels("cuda:0")


def test_build_records_no_off_reason_when_the_kernels_are_built():
    info = kf.build_info()
    assert (info["cuda_off_reasons"] == []) == info["cuda_compiled"]
