"""Packaging as a user meets it: sdist contents, a wheel built from a clean unpack, editable
installs with the pip that Python 3.11 ships (23.2), and the message when torch is missing.

Each test makes fresh virtual environments. torch is not installed into them (several GB): a
folder of links to this environment's site-packages, minus kdseq-fast and the packaging tools,
is put on their path with a .pth file, which is what "torch installed first" looks like to pip
and to the build. Builds are CPU-only (KDSEQ_CUDA=0) and portable to keep them short.
"""
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow

# Left out of the torch folder: what each test installs itself, and this checkout's own install.
_NOT_LINKED = ("kdseq", "__editable__", "pip", "setuptools", "wheel", "_distutils_hack",
               "distutils-precedence.pth", "pkg_resources", "build")


def _site_packages() -> str:
    return os.path.dirname(os.path.dirname(torch.__file__))


def _torch_farm(tmp) -> str:
    farm = os.path.join(tmp, "torch_farm")
    os.makedirs(farm)
    for name in os.listdir(_site_packages()):
        if name.startswith(_NOT_LINKED) or name.endswith(".pth"):
            continue
        os.symlink(os.path.join(_site_packages(), name), os.path.join(farm, name))
    return farm


def _venv(path, *, torch_farm=None, packages=()) -> str:
    # The base interpreter's venv module: its bundled pip is the one a distribution ships.
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", path], check=True)
    py = os.path.join(path, "bin", "python")
    if torch_farm:
        site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                              check=True, capture_output=True, text=True).stdout.strip()
        with open(os.path.join(site, "torch_first.pth"), "w") as fh:
            fh.write(torch_farm + "\n")
    if packages:
        _run([py, "-m", "pip", "install", "-q", *packages])
    return py


def _run(cmd, cwd=None, env=None, check=True, basedir=None):
    full_env = {**os.environ, "KDSEQ_CUDA": "0", "KDSEQ_CPU_ARCH": "portable",
                "PIP_DISABLE_PIP_VERSION_CHECK": "1", **(env or {})}
    if basedir is not None:
        # ccache (when installed) hashes paths relative to this folder: the builds of the
        # different source copies below share their compiled objects.
        full_env["CCACHE_BASEDIR"] = str(basedir)
    full_env.pop("PYTHONPATH", None)
    try:
        # A package index that stops answering must fail the test, not hang CI.
        r = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(map(str, cmd))} did not finish in {exc.timeout:.0f} s") from None
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({r.returncode}):\n"
                             f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}")
    return r


def _pip_version(py) -> str:
    return _run([py, "-m", "pip", "--version"]).stdout.split()[1]


def _tracked_files():
    if not os.path.isdir(os.path.join(ROOT, ".git")) or shutil.which("git") is None:
        return None
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [f for f in out.stdout.splitlines()
            # VCS files are not part of a source release (.ci/ is: tests read .ci/check-gpu).
            if not f.startswith(".git") and os.path.isfile(os.path.join(ROOT, f))]


_SMOKE = ("import os, torch, kdseq_fast as kf; print(os.path.dirname(kf.__file__)); "
          "s = torch.randn(4, 10, requires_grad=True); t = torch.randn(4, 10); "
          "l = kf.kd_loss(s, t, torch.arange(4), ce_weight=0.1); l.backward(); "
          "r = kf.kd_loss_reference(s.detach(), t, torch.arange(4), ce_weight=0.1); "
          "assert abs(float(l) - float(r)) < 1e-4, (float(l), float(r)); "
          "print(kf.build_info()['cpu_isa'])")


def test_sdist_has_the_sources_and_a_clean_unpack_builds_a_portable_wheel(tmp_path):
    pytest.importorskip("build")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(dist), ROOT])
    (sdist,) = glob.glob(str(dist / "*.tar.gz"))
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
        tar.extractall(tmp_path / "unpacked", filter="data")
    top = names[0].split("/")[0]
    inside = {n[len(top) + 1:] for n in names if n.startswith(top + "/")}
    for required in ("pyproject.toml", "setup.py", "README.md", "csrc/row_math.h",
                     "kdseq_fast/configs/digits_quick.yaml", "configs/digits_quick.yaml"):
        assert required in inside, required
    headers = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*"))}
    assert headers <= inside, sorted(headers - inside)
    tracked = _tracked_files()
    if tracked is not None:
        missing = sorted(set(tracked) - inside)
        assert not missing, f"tracked files missing from the sdist: {missing}"

    # A wheel from the clean unpack (no access to this checkout), portable ISA.
    src = tmp_path / "unpacked" / top
    wheels = tmp_path / "wheels"
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(wheels),
          str(src)], basedir=src)
    (wheel,) = glob.glob(str(wheels / "*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        content = zf.namelist()
    assert any(n.startswith("kdseq_fast/_C") and n.endswith(".so") for n in content)
    assert "kdseq_fast/configs/fashion_mnist_resnet20_resnet8_cpu.yaml" in content

    # ... that imports and runs in a fresh venv with the same torch.
    py = _venv(str(tmp_path / "venv"), torch_farm=_torch_farm(str(tmp_path)))
    _run([py, "-m", "pip", "install", "-q", "--no-deps", wheel])
    out = _run([py, "-c", _SMOKE], cwd=str(tmp_path)).stdout.split()
    assert out[0].startswith(str(tmp_path / "venv")), out
    assert out[-1] == "portable"
    # The build records why it left the CUDA kernels out (info and check_cuda_kernels say it).
    why = _run([py, "-c", "import kdseq_fast as kf; print(kf.build_info()['cuda_off_reasons'])"],
               cwd=str(tmp_path)).stdout.strip()
    assert why == "['KDSEQ_CUDA=0 was set']", why


def _source_copy(tmp_path):
    """The checkout without build outputs, run directories or the venv (what a user clones)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "*.so", "__pycache__", "runs", "results",
        ".pytest_cache", ".hypothesis", ".whl"))
    return src


def test_editable_install_with_the_pip_python_ships(tmp_path):
    # The failing report: pip 23.2 + setuptools >= 80 + wheel took the legacy `setup.py develop`
    # path, which re-ran pip with build isolation and could not see torch.
    src = _source_copy(tmp_path)
    py = _venv(str(tmp_path / "venv"), torch_farm=_torch_farm(str(tmp_path)),
               packages=["setuptools>=80", "wheel"])
    pip_version = _pip_version(py)
    r = _run([py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", str(src)], basedir=src)
    assert "setup.py develop" not in r.stdout + r.stderr
    out = _run([py, "-c", _SMOKE], cwd=str(tmp_path)).stdout.split()
    assert out[0] == str(src / "kdseq_fast"), out
    # The console script is installed too.
    assert os.path.exists(os.path.join(tmp_path, "venv", "bin", "kdseq-fast"))
    print(f"editable install OK with pip {pip_version}")


def test_missing_torch_is_a_message_not_a_traceback(tmp_path):
    py = _venv(str(tmp_path / "venv"), packages=["setuptools>=80", "wheel"])
    r = _run([py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", ROOT], check=False)
    text = r.stdout + r.stderr
    assert r.returncode != 0
    assert "torch is not importable in this build environment" in text
    assert "pip install --no-build-isolation" in text and "Traceback" not in text
    # Metadata alone needs no torch (pip reads it before deciding anything).
    r = _run([py, os.path.join(ROOT, "setup.py"), "--version"], cwd=ROOT, check=False)
    version = {}
    with open(os.path.join(ROOT, "kdseq_fast", "_version.py")) as fh:
        exec(fh.read(), version)
    assert r.returncode == 0 and r.stdout.strip().splitlines()[-1] == version["__version__"], \
        r.stdout + r.stderr
    # So does an sdist, with options whose values are not commands (what `python -m build --sdist`
    # passes; the values once made it look like a build and ask for torch). In a copy: sdist writes
    # egg-info next to setup.py.
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.so", "runs", ".whl"))
    r = _run([py, "setup.py", "sdist", "--formats", "gztar", "--dist-dir", str(tmp_path / "dist")], cwd=src,
             check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert glob.glob(str(tmp_path / "dist" / "kdseq_fast-*.tar.gz"))


def test_regular_install_with_the_newest_pip(tmp_path):
    # The other half of the matrix: a non-editable `pip install --no-build-isolation .` with the
    # newest pip (the editable install with it is what `make install` does on every CI run).
    src = _source_copy(tmp_path)
    py = _venv(str(tmp_path / "venv"), torch_farm=_torch_farm(str(tmp_path)),
               packages=["--upgrade", "pip", "setuptools", "wheel"])
    major = int(_pip_version(py).split(".")[0])
    assert major >= 24, _pip_version(py)
    _run([py, "-m", "pip", "install", "--no-build-isolation", "--no-deps", str(src)], basedir=src)
    out = _run([py, "-c", _SMOKE], cwd=str(tmp_path)).stdout.split()
    assert out[0].startswith(str(tmp_path / "venv")), out
