"""Smoke tests for every ``kdseq-fast`` subcommand on tiny synthetic data (and the digits demo)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kdseq_fast import cli

TINY = ["data.name=synthetic", "data.synthetic_train=128", "data.synthetic_test=64",
        "data.image_size=16", "data.loader_backend=torch", "data.num_threads=1",
        "teacher.arch=resnet8", "teacher.epochs=1", "student.arch=resnet8",
        "optim.epochs=3", "optim.batch_size=32", "optim.lr_decay_epochs=[2]",
        "curriculum.warmup_epochs=1", "curriculum.num_phases=1", "curriculum.final_full_epochs=1",
        "train.tensorboard=false"]


def _sets(items):
    out = []
    for s in items:
        out += ["--set", s]
    return out


def _main(argv, capsys):
    rc = cli.main(argv)
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    return cap.out


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert cli.main(["train-teacher", "--out", str(out), "--quiet", "--device", "cpu"]
                    + _sets(TINY)) == 0
    return out / "teacher.pt"


def test_help_runs_as_module():
    proc = subprocess.run([sys.executable, "-m", "kdseq_fast", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for cmd in ("train-teacher", "distill", "compare", "score", "demo"):
        assert cmd in proc.stdout


def test_train_teacher(teacher_ckpt):
    assert teacher_ckpt.exists()
    summary = json.loads((teacher_ckpt.parent / "summary.json").read_text())
    assert summary["teacher"]["steps"] == 4  # 128 / 32 for one epoch


@pytest.mark.parametrize("method", ["ce", "kd", "isl"])
def test_distill(tmp_path, capsys, teacher_ckpt, method):
    out = tmp_path / method
    text = _main(["distill", "--method", method, "--teacher", str(teacher_ckpt), "--out", str(out),
                  "--quiet", "--seed", "3"] + _sets(TINY), capsys)
    assert f"[{method}] phase" in text and "img/s" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"][method]["steps"] == 12
    assert (out / "student.pt").exists()
    assert (out / "phase_1_order.npy").exists() == (method == "isl")


def test_compare_one_summary_and_plots(tmp_path, capsys, teacher_ckpt):
    out = tmp_path / "cmp"
    text = _main(["compare", "--methods", "kd,isl", "--teacher", str(teacher_ckpt),
                  "--out", str(out), "--quiet"] + _sets(TINY), capsys)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"kd", "isl"}
    kd = summary["methods"]["kd"]
    # Default target = the kd baseline's final accuracy, which kd itself reaches at the latest
    # at its last step.
    assert kd["target_acc"] == pytest.approx(kd["test_acc"])
    assert kd["steps_to_target"] is not None and kd["steps_to_target"] <= kd["steps"]
    assert (out / "accuracy_vs_steps.png").exists() and (out / "metrics.jsonl").exists()
    assert "steps (to target)" in text and "plots:" in text


def test_score(tmp_path, capsys, teacher_ckpt):
    out = tmp_path / "scores"
    text = _main(["score", "--checkpoint", str(teacher_ckpt), "--arch", "resnet8",
                  "--teacher", str(teacher_ckpt), "--out", str(out), "--quiet"] + _sets(TINY),
                 capsys)
    scores = np.load(out / "scores_train.npy")
    assert scores.shape == (128, 6)
    # Teacher scored against itself: the kd column is zero up to rounding.
    assert np.abs(scores[:, 1]).max() < 1e-4
    assert "p_true=" in text and "kd=0.0000" in text
    text = _main(["score", "--checkpoint", str(teacher_ckpt), "--arch", "resnet8", "--out", str(out), "--quiet"]
                 + _sets(TINY), capsys)
    assert "kd=n/a" in text and "no --teacher" in text  # no teacher: kd is not a measurement
    # A run's own weights need neither --config nor --arch: the run's config.yaml says both.
    text = _main(["score", "--checkpoint", str(teacher_ckpt), "--out", str(out), "--quiet"], capsys)
    assert "the config of the run that wrote --checkpoint" in text and "with resnet8:" in text
    assert np.load(out / "scores_train.npy").shape == (128, 6)


def test_score_rejects_mismatched_checkpoint(tmp_path, capsys, teacher_ckpt):
    rc = cli.main(["score", "--checkpoint", str(teacher_ckpt), "--arch", "resnet20",
                   "--out", str(tmp_path), "--quiet"] + _sets(TINY))
    err = capsys.readouterr().err
    assert rc == 2 and "does not fit --arch resnet20" in err
    assert "It fits resnet8: --arch resnet8" in err  # which arch it is, as a --teacher mismatch says


def test_demo_on_digits(tmp_path, capsys):
    # The real demo recipe, shrunk: one teacher epoch and three student epochs per method.
    out = tmp_path / "demo"
    text = _main(["demo", "--out", str(out), "--quiet",
                  "--set", "teacher.arch=resnet8", "--set", "teacher.epochs=1",
                  "--set", "optim.epochs=3", "--set", "optim.lr_decay_epochs=[2]",
                  "--set", "curriculum.warmup_epochs=1", "--set", "curriculum.num_phases=1",
                  "--set", "curriculum.final_full_epochs=1"], capsys)
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"ce", "kd", "isl"}
    assert summary["teacher"]["test_acc"] is not None
    for m in ("ce", "kd", "isl"):
        assert (out / m / "student.pt").exists()
    assert "teacher (resnet8)" in text and "plots:" in text
    # Resuming a finished demo does no work and prints the same table.
    text2 = _main(["demo", "--out", str(out), "--quiet", "--resume",
                   "--set", "teacher.arch=resnet8", "--set", "teacher.epochs=1",
                   "--set", "optim.epochs=3", "--set", "optim.lr_decay_epochs=[2]",
                   "--set", "curriculum.warmup_epochs=1", "--set", "curriculum.num_phases=1",
                   "--set", "curriculum.final_full_epochs=1"], capsys)
    assert "already complete" in text2


def test_resume_of_a_finished_run_holds_it_to_its_teacher(tmp_path, capsys, teacher_ckpt):
    import torch

    out = tmp_path / "kd"
    base = ["distill", "--method", "kd", "--out", str(out), "--quiet"] + _sets(TINY)
    _main(base + ["--teacher", str(teacher_ckpt)], capsys)
    assert "already complete" in _main(base + ["--teacher", str(teacher_ckpt), "--resume"], capsys)
    # The same architecture with other weights: the finished run is not this run.
    other = tmp_path / "other_teacher.pt"
    sd = torch.load(teacher_ckpt, weights_only=True)
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in sd.items()}, other)
    rc = cli.main(base + ["--teacher", str(other), "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "distilled from other teacher weights" in err


def test_compare_checks_its_inputs_before_any_student_trains(tmp_path, capsys, teacher_ckpt):
    out = tmp_path / "cmp"
    rc = cli.main(["compare", "--teacher", str(teacher_ckpt) + "x", "--out", str(out), "--quiet"]
                  + _sets(TINY))
    assert rc == 2 and "teacher checkpoint not found" in capsys.readouterr().err
    assert not (out / "ce").exists()  # ce did not train first
    rc = cli.main(["compare", "--teacher", str(teacher_ckpt), "--out", str(out), "--quiet",
                   "--set", "teacher.arch=resnet20"] + _sets(TINY[:6] + TINY[7:]))
    err = capsys.readouterr().err
    assert rc == 2 and "does not fit teacher.arch=resnet20" in err
    assert "It fits resnet8: --set teacher.arch=resnet8" in err  # which architecture it is
    assert not (out / "ce").exists()
    for methods, msg in [("ce,ce", "'ce' is given twice"), (",", "none given")]:
        rc = cli.main(["compare", "--methods", methods, "--out", str(out), "--quiet"] + _sets(TINY))
        assert rc == 2 and msg in capsys.readouterr().err


def test_a_run_stopped_while_it_writes_its_results_finishes_them_on_resume(tmp_path, capsys, monkeypatch):
    # summary.json marks a run complete: the plots came after it, so a run killed while drawing
    # kept no plots, and --resume said "already complete". A lost student.pt likewise.
    import torch

    from kdseq_fast import reports

    out = tmp_path / "run"
    argv = ["distill", "--method", "ce", "--out", str(out), "--quiet", "--device", "cpu"] + _sets(TINY)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands for the kill

    monkeypatch.setattr(reports, "plot_accuracy", killed)
    assert cli.main(argv) == 130  # an interrupt the graceful stop did not see: exit 130, a message
    assert "interrupted (SIGINT): distill stopped before it finished" in capsys.readouterr().err
    monkeypatch.undo()
    assert (out / "student.pt").exists() and not (out / "summary.json").exists()
    _main(argv + ["--resume"], capsys)
    assert (out / "summary.json").exists() and (out / "accuracy_vs_steps.png").stat().st_size > 0
    weights = torch.load(out / "student.pt", weights_only=True)
    (out / "student.pt").unlink()
    _main(argv + ["--resume"], capsys)
    again = torch.load(out / "student.pt", weights_only=True)
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_a_plot_is_written_whole_or_not_at_all(tmp_path):
    import matplotlib

    from kdseq_fast import reports

    path = str(tmp_path / "acc.png")
    reports.plot_accuracy({"kd": [{"steps": 1, "test_acc": 0.5}]}, path)
    before = open(path, "rb").read()
    original = matplotlib.figure.Figure.savefig

    def torn(self, fh, **kwargs):
        fh.write(b"half a png")
        raise KeyboardInterrupt

    matplotlib.figure.Figure.savefig = torn
    try:
        with pytest.raises(KeyboardInterrupt):
            reports.plot_accuracy({"kd": [{"steps": 2, "test_acc": 0.6}]}, path)
    finally:
        matplotlib.figure.Figure.savefig = original
    assert open(path, "rb").read() == before and os.listdir(tmp_path) == ["acc.png"]


@pytest.mark.parametrize("command", ["distill", "compare", "demo"])
def test_an_empty_out_is_refused_not_the_working_directory(tmp_path, monkeypatch, capsys, command):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--out", "", "--quiet"] + _sets(TINY))
    assert exc.value.code == 2 and "--out: must be a non-empty path" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_a_run_checkpoint_is_a_teacher_and_a_score_checkpoint(tmp_path, capsys, teacher_ckpt):
    ckpt = teacher_ckpt.parent / "checkpoint.pt"  # the run's own checkpoint (header, checksum)
    _main(["distill", "--method", "kd", "--teacher", str(ckpt), "--out", str(tmp_path / "kd"), "--quiet"]
          + _sets(TINY), capsys)
    _main(["score", "--checkpoint", str(ckpt), "--arch", "resnet8", "--teacher", str(ckpt),
           "--out", str(tmp_path / "s"), "--quiet"] + _sets(TINY), capsys)
    assert np.abs(np.load(tmp_path / "s" / "scores_train.npy")[:, 1]).max() < 1e-4  # same weights
    not_a_checkpoint = tmp_path / "notes.txt"
    not_a_checkpoint.write_text("hello")
    rc = cli.main(["score", "--checkpoint", str(not_a_checkpoint), "--out", str(tmp_path / "s2"), "--quiet"]
                  + _sets(TINY))
    err = capsys.readouterr().err
    assert rc == 2 and "is not a PyTorch checkpoint" in err and "weights_only" not in err


def test_an_unusable_out_is_exit_2_before_any_work(tmp_path, capsys, teacher_ckpt):
    a_file = tmp_path / "taken.txt"
    a_file.write_text("x")
    for out in (a_file, a_file / "sub"):
        for cmd in (["distill", "--method", "ce"], ["score", "--checkpoint", str(teacher_ckpt),
                                                     "--arch", "resnet8"]):
            rc = cli.main(cmd + ["--out", str(out), "--quiet"] + _sets(TINY))
            err = capsys.readouterr().err
            assert rc == 2 and "\nerror:" in "\n" + err and "Traceback" not in err, err
            assert f"{a_file}: a file is in the way" in err or f"{out}: a file is in the way" in err, err


def test_resume_and_overwrite_together_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["distill", "--out", str(tmp_path), "--resume", "--overwrite"])
    assert exc.value.code == 2 and "not allowed with argument" in capsys.readouterr().err


def test_unknown_config_key_is_exit_2(tmp_path, capsys):
    rc = cli.main(["distill", "--out", str(tmp_path), "--set", "optim.learning_rate=0.1"])
    assert rc == 2 and "optim.learning_rate" in capsys.readouterr().err


def test_find_config_packaged_name(tmp_path, monkeypatch):
    assert os.path.basename(cli.find_config("digits_quick")) == "digits_quick.yaml"
    with pytest.raises(FileNotFoundError, match="not_a_recipe"):
        cli.find_config("not_a_recipe")
    # The README's form, run outside the source tree, finds the packaged recipe; other directories
    # are not second-guessed.
    monkeypatch.chdir(tmp_path)
    found = cli.find_config("configs/cifar100_resnet32x4_resnet8x4.yaml")
    assert os.path.isfile(found) and os.path.basename(found) == "cifar100_resnet32x4_resnet8x4.yaml"
    with pytest.raises(FileNotFoundError):
        cli.find_config("elsewhere/cifar100_resnet32x4_resnet8x4.yaml")


def test_config_that_is_not_utf8_names_the_file(tmp_path, capsys):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("seed: 1  # r\xe9sum\xe9\n".encode("latin-1"))
    rc = cli.main(["distill", "--config", str(bad), "--out", str(tmp_path / "o")])
    assert rc == 2 and f"{bad} is not UTF-8 text" in capsys.readouterr().err


def test_info_reports_the_build(capsys):
    import kdseq_fast as kf

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    info = kf.build_info()
    assert f"kdseq-fast {kf.__version__}" in out and f"torch {info['torch']}" in out
    assert ("CUDA kernels: yes" in out) == info["cuda_compiled"]
    assert " ".join(info["cuda_targets"]) in out
    assert cli.main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["kdseq_fast"] == info
    assert isinstance(data["gpus"], list) and ("dali" in data and "dali_error" in data)


def test_info_and_runs_on_a_gpu_the_kernels_cannot_run_on(tmp_path, capsys, monkeypatch):
    # One visible GPU for which the build has no code: info says so with the fix, and a run that
    # needs the kernels stops with exit 2 and the same message, not a traceback.
    import types

    import torch

    from kdseq_fast import _extension, env_info, runs

    def refuse(device):
        if torch.device(device).type == "cuda":
            raise _extension.CudaKernelsUnavailable("rebuild with TORCH_CUDA_ARCH_LIST=\"7.5\"")

    props = types.SimpleNamespace(name="Tesla T4", major=7, minor=5, total_memory=15 * 2**30,
                                  multi_processor_count=40)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props)
    monkeypatch.setattr(env_info, "check_cuda_kernels", refuse)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cuda:0: Tesla T4, compute capability 7.5, 15.0 GiB, 40 SMs: THE KERNELS CANNOT RUN HERE" in out
    assert 'TORCH_CUDA_ARCH_LIST="7.5"' in out

    monkeypatch.setattr(runs, "check_cuda_kernels", lambda device: refuse("cuda:0"))
    rc = cli.main(["demo", "--out", str(tmp_path / "demo"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and 'error: rebuild with TORCH_CUDA_ARCH_LIST="7.5"' in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "demo" / "teacher")


def test_info_report_of_a_cpu_only_build():
    from kdseq_fast.env_info import format_report

    build = {"version": "9.9", "torch": "2.4.1+cpu", "cuda_compiled": False, "cuda_archs": [], "cuda_targets": [],
             "openmp": True, "cpu_isa": "portable", "compiler": "12.2.0"}
    text = format_report({"kdseq_fast": build, "python": "3.11.7", "platform": "Linux", "torch_cuda": None,
                          "gpus": [], "dali": None, "dali_error": "nvidia-dali not importable (ImportError: x)"})
    assert "torch 2.4.1+cpu (CUDA none: a CPU-only build)" in text
    assert "CUDA kernels: no, left out at build time: not recorded" in text and "ISA portable, OpenMP yes" in text
    assert "DALI loader: not available (nvidia-dali not importable" in text and "GPUs: none visible" in text
    build["cuda_off_reasons"] = ["KDSEQ_CUDA=0 was set"]
    text = format_report({"kdseq_fast": build, "python": "3.11.7", "platform": "Linux", "torch_cuda": "13.0",
                          "gpus": [], "dali": None, "dali_error": "x"})
    assert "CUDA kernels: no, left out at build time: KDSEQ_CUDA=0 was set" in text


def test_a_short_baseline_needs_no_curriculum_overrides(tmp_path, capsys, teacher_ckpt):
    # ce and kd never read the curriculum: a 2-epoch kd run on TINY (whose curriculum tiles 3
    # epochs) trains, resumes and is scored; an isl run of it, alone or in a comparison, is
    # refused before anything is written or trained.
    short = _sets([s for s in TINY if not s.startswith("optim.")]
                  + ["optim.epochs=2", "optim.batch_size=32", "optim.lr_decay_epochs=[1]"])
    out = tmp_path / "kd"
    _main(["distill", "--method", "kd", "--teacher", str(teacher_ckpt), "--out", str(out), "--quiet",
           "--device", "cpu"] + short, capsys)
    assert "already complete" in _main(["distill", "--method", "kd", "--teacher", str(teacher_ckpt), "--out",
                                        str(out), "--quiet", "--device", "cpu", "--resume"] + short, capsys)
    _main(["score", "--checkpoint", str(out / "student.pt"), "--out", str(tmp_path / "scores"), "--quiet",
           "--device", "cpu"], capsys)
    for argv in (["distill", "--method", "isl"], ["compare", "--methods", "ce,isl"]):
        target = tmp_path / argv[0]
        rc = cli.main(argv + ["--teacher", str(teacher_ckpt), "--out", str(target), "--quiet",
                              "--device", "cpu"] + short)
        assert rc == 2 and "epoch accounting" in capsys.readouterr().err
        assert not target.exists()


def test_a_build_whose_extension_does_not_load_still_reports_itself(tmp_path):
    # A None in sys.modules makes `from . import _C` fail as a missing or mismatched build does.
    code = """
import json, sys
sys.modules["kdseq_fast._C"] = None
import kdseq_fast
from kdseq_fast import cli
print("INFO_RC", cli.main(["info"]))
print("RUN_RC", cli.main(["distill", "--method", "ce", "--out", sys.argv[1], "--quiet"]))
try:
    kdseq_fast.kd_loss
except ImportError as exc:
    print("OP_ERROR", type(exc).__name__, "could not be loaded" in str(exc))
try:
    import kdseq_fast.scoring
except ImportError as exc:
    print("SCORING_ERROR", type(exc).__name__)
"""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=120)
    assert not out.exists()  # refused before anything was written
    assert proc.returncode == 0, proc.stderr
    assert "INFO_RC 0" in proc.stdout and "EXTENSION NOT LOADED: kdseq_fast's compiled extension" in proc.stdout
    assert "pip install --no-build-isolation" in proc.stdout and "DALI loader:" in proc.stdout
    assert "RUN_RC 2" in proc.stdout and "error: kdseq_fast's compiled extension" in proc.stderr
    assert "OP_ERROR ImportError True" in proc.stdout
    assert "SCORING_ERROR ExtensionNotLoaded" in proc.stdout


def test_an_out_holding_other_results_is_refused_not_overwritten(tmp_path, capsys, teacher_ckpt):
    # A new user's slips: distill into a compare/demo folder, compare into a single run's folder,
    # a run into a folder of results without run.json. Each deleted or overwrote results.
    cmp_dir, single = tmp_path / "cmp", tmp_path / "single"
    _main(["compare", "--methods", "ce", "--out", str(cmp_dir), "--quiet"] + _sets(TINY), capsys)
    before = (cmp_dir / "summary.json").read_text()
    rc = cli.main(["distill", "--method", "ce", "--out", str(cmp_dir), "--quiet"] + _sets(TINY))
    assert rc == 2 and "holds a comparison (compare/demo of ce)" in capsys.readouterr().err
    assert (cmp_dir / "summary.json").read_text() == before
    _main(["distill", "--method", "ce", "--out", str(single), "--quiet"] + _sets(TINY), capsys)
    before = (single / "summary.json").read_text()
    rc = cli.main(["compare", "--methods", "ce", "--out", str(single), "--quiet"] + _sets(TINY))
    assert rc == 2 and "holds a single run (role student, method ce)" in capsys.readouterr().err
    assert (single / "summary.json").read_text() == before and not (single / "ce").exists()
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "summary.json").write_text(before)
    rc = cli.main(["distill", "--method", "ce", "--out", str(loose), "--quiet"] + _sets(TINY))
    assert rc == 2 and "holds results that are not a run's (summary.json" in capsys.readouterr().err
    assert (loose / "summary.json").read_text() == before
    rc = cli.main(["compare", "--methods", "ce", "--out", str(loose), "--quiet"] + _sets(TINY))
    assert rc == 2 and "holds results that are not a comparison's (summary.json" in capsys.readouterr().err
    assert (loose / "summary.json").read_text() == before
    # A refused folder is left as it was found: no .lock of ours in it; a run's own .lock stays.
    assert sorted(os.listdir(loose)) == ["summary.json"]
    assert (single / ".lock").exists()
    # --overwrite is the way to reuse it.
    _main(["compare", "--methods", "ce", "--out", str(single), "--quiet", "--overwrite"] + _sets(TINY), capsys)
    assert not (single / "student.pt").exists() and (single / "ce" / "student.pt").exists()
    # A comparison written before compare marked its folder (no run.json at the top) resumes.
    os.remove(cmp_dir / "run.json")
    _main(["compare", "--methods", "ce", "--out", str(cmp_dir), "--quiet", "--resume"] + _sets(TINY), capsys)


def test_a_running_comparison_holds_its_folder(tmp_path, capsys, monkeypatch):
    # A run started into a comparison's folder while it trains would take the folder over.
    from kdseq_fast import runs

    out = tmp_path / "cmp"
    seen = []
    distill = runs.distill

    def distill_and_probe(*args, **kwargs):
        probe = subprocess.run([sys.executable, "-c", "from kdseq_fast.run_dir import acquire_dir_lock; "
                                f"acquire_dir_lock({str(out)!r})"], capture_output=True, text=True)
        seen.append("in use by another process" in probe.stderr)
        return distill(*args, **kwargs)

    monkeypatch.setattr(runs, "distill", distill_and_probe)
    _main(["compare", "--methods", "ce", "--out", str(out), "--quiet"] + _sets(TINY), capsys)
    assert seen == [True]
    probe = subprocess.run([sys.executable, "-c", "from kdseq_fast.run_dir import acquire_dir_lock; "
                            f"acquire_dir_lock({str(out)!r}); print('free')"], capture_output=True, text=True)
    assert probe.stdout.strip() == "free", probe.stderr


def test_overwrite_starts_the_tensorboard_curves_and_plots_over(tmp_path, capsys):
    out = tmp_path / "run"
    sets = _sets([t for t in TINY if not t.startswith("train.tensorboard")] + ["train.tensorboard=true"])
    _main(["distill", "--method", "ce", "--out", str(out), "--quiet"] + sets, capsys)
    first = sorted(p.name for p in (out / "tb").iterdir())
    (out / "pacing.png").write_bytes(b"an older isl run's plot")
    _main(["distill", "--method", "ce", "--out", str(out), "--quiet", "--overwrite"] + sets, capsys)
    assert not (out / "pacing.png").exists()
    assert len(list((out / "tb").iterdir())) == len(first)  # one run's events, not two


def test_a_run_directory_in_use_by_another_process_is_refused(tmp_path, capsys):
    # Two processes training into one --out (a job launched twice, a --resume while it still runs)
    # would interleave checkpoints and metrics: the second is refused, naming the first.
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from kdseq_fast.run_dir import acquire_dir_lock; "
         f"acquire_dir_lock({str(out)!r}); print('held', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc = cli.main(["distill", "--method", "ce", "--out", str(out), "--quiet", "--resume"] + _sets(TINY))
        err = capsys.readouterr().err
        assert rc == 2 and f"is in use by another process (pid {holder.pid})" in err, err
        assert not (out / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # Released with its process; and this process's finished run releases it too.
    _main(["distill", "--method", "ce", "--out", str(out), "--quiet"] + _sets(TINY), capsys)
    probe = subprocess.run([sys.executable, "-c", "from kdseq_fast.run_dir import acquire_dir_lock; "
                            f"acquire_dir_lock({str(out)!r}); print('free')"], capture_output=True, text=True)
    assert probe.stdout.strip() == "free", probe.stderr


def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path, capsys):
    not_ckpt = tmp_path / "teacher.yaml"
    not_ckpt.write_text("teacher:\n  arch: resnet8\n")
    rc = cli.main(["distill", "--method", "kd", "--teacher", str(not_ckpt), "--out", str(tmp_path / "kd"),
                   "--quiet"] + _sets(TINY))
    err = capsys.readouterr().err
    assert rc == 2 and "is not a PyTorch checkpoint (torch.save writes a zip archive or a pickle" in err, err


def test_no_config_says_what_runs_and_an_oversized_subset_is_refused(tmp_path, capsys):
    rc = cli.main(["distill", "--method", "ce", "--out", str(tmp_path / "ce"), "--quiet"]
                  + _sets(["data.name=digits", "data.train_subset=100000"]))
    err = capsys.readouterr().err
    assert "note: no --config; using the built-in defaults (digits, resnet32x4 -> resnet8x4, 240 epochs)" in err
    assert rc == 2 and "'data.train_subset' is 100000, but the training split of digits has 1437 images" in err


def test_compare_computes_the_teacher_logits_once(tmp_path, capsys, teacher_ckpt):
    out = tmp_path / "cmp"
    _main(["compare", "--methods", "kd,isl", "--teacher", str(teacher_ckpt), "--out", str(out), "--quiet",
           "--set", "data.augment=none"] + _sets(TINY), capsys)
    assert len(list((out / "cache").glob("*.npy"))) == 1
    assert not (out / "kd" / "cache").exists() and not (out / "isl" / "cache").exists()


def test_a_file_system_without_flock_runs_unlocked(tmp_path, monkeypatch):
    import errno
    import fcntl

    from kdseq_fast import run_dir

    def unsupported(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", unsupported)
    run_dir.acquire_dir_lock(str(tmp_path))  # no error: a network mount must not make runs impossible
    assert str(tmp_path) not in run_dir._LOCKS
    run_dir.release_dir_lock(str(tmp_path))


def test_a_trainer_that_fails_to_build_releases_its_directory(tmp_path):
    # Its exception (kept alive by a notebook or a caller) must not keep the directory locked.
    from kdseq_fast.config import load_config
    from kdseq_fast.trainer import Trainer

    out = tmp_path / "kd"
    with pytest.raises(FileNotFoundError) as kept:
        Trainer(load_config(None, TINY + ["device=cpu"]), str(out), method="kd", teacher=str(tmp_path / "missing.pt"),
                quiet=True, log=lambda m: None)
    probe = subprocess.run([sys.executable, "-c", "from kdseq_fast.run_dir import acquire_dir_lock; "
                            f"acquire_dir_lock({str(out)!r}); print('free')"], capture_output=True, text=True)
    assert probe.stdout.strip() == "free", probe.stderr
    assert kept.value is not None
