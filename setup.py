"""Build script for kdseq-fast's ``kdseq_fast._C`` extension (C++ CPU kernels + CUDA kernels).

The project metadata (name, version, dependencies, extras, entry points) lives in pyproject.toml;
this file only decides how the extension is compiled. torch is not a build requirement: the
extension compiles against the torch already installed, so build without isolation:

    pip install torch                          # first: the torch you will run with
    pip install --no-build-isolation .         # or -e . for development

Environment switches
--------------------
KDSEQ_CUDA=0|1           force the CUDA kernels off / on (default: on when torch has CUDA and a
                         matching nvcc is found)
TORCH_CUDA_ARCH_LIST     CUDA architectures (default "8.0;9.0+PTX")
KDSEQ_CPU_ARCH=native|portable|<march>
                         CPU code generation: "native" (default, e.g. AVX2+FMA here), "portable"
                         (baseline x86-64 / aarch64, for wheels that travel), or any -march value
KDSEQ_DEBUG=1            -O0 -g builds
KDSEQ_NVCC_THREADS=N     architectures nvcc compiles at once (default: one a target, at most one
                         a core)
CUDA_HOME                CUDA toolkit; defaults to /usr/local/cuda when unset and nvcc is there
``ccache`` is used automatically when it is on PATH.
"""
import os
import platform
import re
import shutil
import subprocess
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))

# torch.utils.cpp_extension reads CUDA_HOME at import time and may guess /usr/local otherwise.
if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"
if not os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip():
    # Unset or empty (TORCH_CUDA_ARCH_LIST= pip install ..., a Docker ENV set to ""): the default.
    os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"
if shutil.which("ccache"):
    # Debian's ccache masquerade directory; CXX="ccache c++" breaks torch's ninja file.
    if os.path.isdir("/usr/lib/ccache") and "/usr/lib/ccache" not in os.environ.get("PATH", ""):
        os.environ["PATH"] = "/usr/lib/ccache:" + os.environ.get("PATH", "")
    nvcc_path = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    if os.path.exists(nvcc_path):
        os.environ.setdefault("PYTORCH_NVCC", f"ccache {nvcc_path}")

# Commands that only describe the project (metadata, source distributions) need no compiler and
# no torch; every command that builds the extension does.
METADATA_ONLY = {"egg_info", "dist_info", "sdist", "check", "clean", "--name", "--version",
                 "--help", "-h", "--help-commands"}
BUILDS = {"build", "build_ext", "build_py", "build_clib", "bdist", "bdist_wheel", "bdist_egg", "install",
          "develop", "editable_wheel"}

TORCH_MISSING = """
kdseq-fast: torch is not importable in this build environment ({error}).

kdseq-fast compiles its C++/CUDA extension against the torch you will run it with, so torch is
not a build requirement, and pip must not build it in an isolated environment (which has no
torch). Install torch first, then build without isolation:

    pip install torch
    pip install --no-build-isolation kdseq-fast      # from a checkout: --no-build-isolation -e .

With python -m build, add --no-isolation.
"""


def _metadata_only(argv):
    # Options' values (sdist --dist-dir DIR, dist_info --output-dir DIR) are neither kind of word.
    return any(a in METADATA_ONLY for a in argv) and not any(a in BUILDS for a in argv)


try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:
    if not _metadata_only(sys.argv[1:]):
        sys.exit(TORCH_MISSING.format(error=exc))
    torch = cpp_extension = None


def nvcc_version(cuda_home):
    try:
        out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def want_cuda():
    """(build them, why, codes): codes name each reason the kernels are left out, without spaces,
    so the extension can carry them as one define (build_info()["cuda_off_reasons"]; the words for
    each code are in kdseq_fast/_extension.py's CUDA_OFF_REASONS)."""
    flag = os.environ.get("KDSEQ_CUDA")
    if flag == "0":
        return False, "KDSEQ_CUDA=0", ["env_off"]
    cuda_home = cpp_extension.CUDA_HOME
    reasons, codes = [], []
    if torch.version.cuda is None:
        reasons.append("torch is a CPU-only build")
        codes.append("cpu_torch")
    if cuda_home is None:
        reasons.append("no CUDA toolkit found (set CUDA_HOME)")
        codes.append("no_toolkit")
    else:
        found = nvcc_version(cuda_home)
        if found is None:
            reasons.append(f"no working nvcc under {cuda_home}")
            codes.append("no_nvcc")
        elif torch.version.cuda is not None and found.split(".")[0] != torch.version.cuda.split(".")[0]:
            reasons.append(f"nvcc {found} does not match torch's CUDA {torch.version.cuda}")
            codes.append("nvcc_mismatch")
    if reasons:
        if flag == "1":
            raise RuntimeError("KDSEQ_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))
        return False, "; ".join(reasons), codes
    return True, f"nvcc under {cuda_home}, archs {os.environ['TORCH_CUDA_ARCH_LIST']}", []


def cuda_fallback_includes(cuda_home):
    """Header dirs of the pip CUDA libraries (nvidia-* wheels that torch depends on).

    ATen's CUDA headers include cuSPARSE/cuBLAS/cuSOLVER headers; a toolkit installed without those
    libraries (as here: nvcc at /usr/local/cuda) still builds when the wheels' headers are searched
    after the toolkit's own (-isystem)."""
    if os.path.exists(os.path.join(cuda_home, "include", "cusparse.h")):
        return []
    import glob
    import site

    roots = site.getsitepackages() + [site.getusersitepackages()]
    found = []
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if os.path.exists(os.path.join(inc, "cusparse.h")) and inc not in found:
                found.append(inc)
    return found


def cpu_arch_flags():
    arch = os.environ.get("KDSEQ_CPU_ARCH", "native")
    if arch == "portable":
        # The ISA's baseline, named: a compiler's own default can be newer (x86-64-v2/v3 on some
        # distributions), and the wheel would not run on every CPU of the architecture.
        baseline = {"x86_64": "x86-64", "amd64": "x86-64", "aarch64": "armv8-a", "arm64": "armv8-a"}
        machine = platform.machine().lower()
        return ([f"-march={baseline[machine]}"] if machine in baseline else []), "portable"
    return [f"-march={arch}"], arch


def gcc_scheduling_flags():
    """GCC's pre-register-allocation scheduler is off by default on x86. The row-math loops are long
    chains of dependent FMAs (two exponentials an element) and interleaving independent ones
    measured ~10% faster; clang schedules by default and does not know -fsched-pressure."""
    import shlex

    cxx = shlex.split(os.environ.get("CXX", "c++")) or ["c++"]
    try:
        version = subprocess.run(cxx + ["--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    if "clang" in version.lower() or "Free Software Foundation" not in version:
        return []
    return ["-fschedule-insns", "-fsched-pressure"]


def cuda_targets():
    """What nvcc emits for TORCH_CUDA_ARCH_LIST, named as torch.cuda.get_arch_list() names them
    ("sm_80" machine code, "compute_90" PTX): read from the -gencode flags torch's build passes to
    nvcc, so named archs ("Hopper") and "+PTX" expand exactly as they are compiled. build_info()
    reports them, and they decide whether a GPU can run the kernels (kdseq_fast._extension)."""
    try:
        flags = cpp_extension._get_cuda_arch_flags()
    except ValueError as exc:
        raise ValueError(f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']!r}: {exc}") from None
    targets = []
    for flag in flags:
        m = re.search(r"code=\[?([\w,]+)\]?$", flag)
        targets += [t for t in (m.group(1).split(",") if m else []) if t not in targets]
    return targets


def nvcc_threads(targets):
    """nvcc compiles a source once per target, one after the other unless --threads lets it run
    them side by side: one thread a target, at most one a core. KDSEQ_NVCC_THREADS overrides it
    (1 = sequential)."""
    override = os.environ.get("KDSEQ_NVCC_THREADS")
    if override:
        if not override.isdigit() or int(override) < 1:
            raise ValueError(f"KDSEQ_NVCC_THREADS must be a whole number >= 1, got {override!r}")
        return int(override)
    return max(1, min(len(targets), os.cpu_count() or 1))


def make_extension():
    with_cuda, why, off_codes = want_cuda()
    arch_flags, isa = cpu_arch_flags()
    debug = os.environ.get("KDSEQ_DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -fno-trapping-math: lets GCC if-convert the selects in the row math so the exp loops
    # vectorize (we never rely on floating-point exception flags).
    cxx = opt + ["-fopenmp", "-fno-trapping-math", "-Wall", "-Wno-unknown-pragmas"] + arch_flags
    if not debug:
        cxx += gcc_scheduling_flags()
    cxx.append(f'-DKDSEQ_CPU_ISA="{isa}"')
    if off_codes:
        cxx.append(f'-DKDSEQ_CUDA_OFF="{",".join(off_codes)}"')
    sources = ["csrc/ops.cpp", "csrc/kd_loss_cpu.cpp", "csrc/instance_scores_cpu.cpp"]
    extra = {"cxx": cxx}
    print(f"kdseq-fast: CUDA kernels {'ON' if with_cuda else 'OFF'} ({why}); CPU ISA {isa}")
    if with_cuda:
        archs = os.environ["TORCH_CUDA_ARCH_LIST"]
        targets = cuda_targets()
        defines = ["-DKDSEQ_WITH_CUDA", f'-DKDSEQ_CUDA_ARCHS="{archs}"',
                   f'-DKDSEQ_CUDA_TARGETS="{",".join(targets)}"']
        extra["cxx"] = extra["cxx"] + defines
        fallback = []
        for inc in cuda_fallback_includes(cpp_extension.CUDA_HOME):
            fallback += ["-isystem", inc]
        extra["cxx"] = extra["cxx"] + fallback
        extra["nvcc"] = (opt + ["-lineinfo", "--expt-relaxed-constexpr", f"--threads={nvcc_threads(targets)}"]
                         + defines + fallback)
        sources += ["csrc/kd_loss_cuda.cu", "csrc/instance_scores_cuda.cu"]
        ext_cls = cpp_extension.CUDAExtension
    else:
        ext_cls = cpp_extension.CppExtension
    return ext_cls(
        name="kdseq_fast._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
    )



if torch is None:
    # Metadata or an sdist without torch: nothing is compiled, no extension objects are needed.
    setup()
else:
    setup(ext_modules=[make_extension()],
          cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)})
