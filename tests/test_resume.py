"""Crash safety (issue 9): kill-and-resume is bit-identical, corrupt checkpoints fall back,
preemption checkpoints and exits 0, non-finite losses stop cleanly, bad inputs are clear errors.

The kill tests run the real CLI in a subprocess and SIGKILL it from inside at an exact point
(``KDSEQ_TEST_KILL_AT_STEP`` / ``KDSEQ_TEST_KILL_AT_SCORING``), then resume and compare every
tensor of ``student.pt`` with ``torch.equal`` against an uninterrupted run with the same seed.
Runs are tiny (192 synthetic 16-px images, resnet8, 36 steps) so the file takes about a minute.
"""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from kdseq_fast import cli
from kdseq_fast.runtime import (CheckpointError, load_checkpoint, load_latest_checkpoint,
                                save_checkpoint)

# 6 steps per epoch; epochs: 1 warm-up | phase 1 (2) | phase 2 (2) | 1 final = 36 steps.
TINY = [
    "data.name=synthetic", "data.synthetic_train=192", "data.synthetic_test=64",
    "data.synthetic_classes=10", "data.image_size=16", "data.augment=cifar",
    "data.loader_backend=torch", "data.num_threads=1",
    "teacher.arch=resnet8", "student.arch=resnet8",
    "optim.epochs=6", "optim.batch_size=32", "optim.lr_decay_epochs=[5]",
    "curriculum.warmup_epochs=1", "curriculum.num_phases=2", "curriculum.final_full_epochs=1",
    "train.checkpoint_every_steps=4", "train.tensorboard=false", "deterministic=true",
]


def _args(out, teacher, extra=()):
    args = ["distill", "--method", "isl", "--teacher", str(teacher), "--out", str(out),
            "--quiet", "--device", "cpu"]
    for s in TINY + list(extra):
        args += ["--set", s]
    return args


def _run(args, env_extra=None, check=True):
    env = dict(os.environ)
    for k in list(env):
        if k.startswith("KDSEQ_TEST_"):
            del env[k]
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-m", "kdseq_fast", *args], env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def _weights(run_dir):
    return torch.load(os.path.join(run_dir, "student.pt"), weights_only=True)


def _assert_identical(a_dir, b_dir):
    a, b = _weights(a_dir), _weights(b_dir)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"tensors differ after resume: {diff[:5]}"
    for k in (1, 2):
        assert np.array_equal(np.load(os.path.join(a_dir, f"phase_{k}_order.npy")),
                              np.load(os.path.join(b_dir, f"phase_{k}_order.npy")))

    def rows(d):
        with open(os.path.join(d, "metrics.jsonl")) as fh:
            return [(r["epoch"], r["steps"], r["train_loss"], r["test_acc"])
                    for r in map(json.loads, fh)]
    assert rows(a_dir) == rows(b_dir)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    from kdseq_fast.models import get_model

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(get_model("resnet8", 10, image_size=16).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher):
    out = tmp_path_factory.mktemp("ref") / "run"
    _run(_args(out, teacher))
    return out


@pytest.mark.parametrize("where,env", [
    ("inside warm-up", {"KDSEQ_TEST_KILL_AT_STEP": "5"}),
    ("phase boundary", {"KDSEQ_TEST_KILL_AT_SCORING": "1"}),
    ("mid-phase", {"KDSEQ_TEST_KILL_AT_STEP": "15"}),
    ("just after a checkpoint", {"KDSEQ_TEST_KILL_AT_STEP": "24"}),
])
def test_kill_and_resume_is_bit_identical(tmp_path, teacher, reference, where, env):
    out = tmp_path / "run"
    killed = _run(_args(out, teacher), env, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not os.path.exists(out / "student.pt")
    resumed = _run(_args(out, teacher) + ["--resume"])
    assert "resuming from" in resumed.stdout
    _assert_identical(reference, out)


def test_resume_may_change_where_and_how_often_and_stays_bit_identical(tmp_path, teacher, reference):
    # README: where a run runs, where its data and cache live, how often it checkpoints and reads
    # the device may differ on --resume (RESUME_IGNORED_KEYS); the result may not.
    out = tmp_path / "run"
    killed = _run(_args(out, teacher), {"KDSEQ_TEST_KILL_AT_STEP": "15"}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    changed = ["train.checkpoint_every_steps=5", "train.log_every_steps=3", "data.num_threads=2",
               f"data.root={tmp_path / 'elsewhere'}", f"train.teacher_cache_dir={tmp_path / 'cache2'}",
               "train.target_acc=0.5", "train.nonfinite=skip"]
    resumed = _run(_args(out, teacher, changed) + ["--resume"])
    assert "resuming from" in resumed.stdout
    _assert_identical(reference, out)


def test_a_checkpoint_with_channels_last_momentum_resumes_bit_identical(tmp_path, teacher, reference):
    # A GPU run keeps its conv weights, and so its momentum buffers, channels-last; resumed as a
    # deterministic CPU run (NCHW) the buffers take the parameters' layout again: the CPU's fused
    # SGD computes wrong updates from mismatched layouts (and CUDA's refuses them).
    out = tmp_path / "run"
    killed = _run(_args(out, teacher), {"KDSEQ_TEST_KILL_AT_STEP": "15"}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    state = load_checkpoint(str(out / "checkpoint.pt"))
    buffers = [s["momentum_buffer"] for s in state["optimizer"]["state"].values() if "momentum_buffer" in s]
    convs = [b for b in buffers if b.dim() == 4]
    assert convs
    for s in state["optimizer"]["state"].values():
        if s.get("momentum_buffer") is not None and s["momentum_buffer"].dim() == 4:
            s["momentum_buffer"] = s["momentum_buffer"].contiguous(memory_format=torch.channels_last)
    save_checkpoint(state, str(out))
    resumed = _run(_args(out, teacher) + ["--resume"])
    assert "resuming from checkpoint.pt" in resumed.stdout
    _assert_identical(reference, out)


@pytest.mark.parametrize("every", [4, 1000])  # resumed inside epoch 2 (step 12) / at epoch 1's end
def test_tensorboard_shows_each_epoch_once_after_a_kill_between_scalars_and_checkpoint(tmp_path, teacher,
                                                                                       every):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    extra = ["train.tensorboard=true", f"train.checkpoint_every_steps={every}"]
    killed = _run(_args(out, teacher, extra), {"KDSEQ_TEST_KILL_AT_EPOCH_END": "2"}, check=False)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    _run(_args(out, teacher, extra) + ["--resume"])
    with open(out / "metrics.jsonl") as fh:
        records = [json.loads(line) for line in fh]
    events = EventAccumulator(str(out / "tb"))
    events.Reload()
    points = events.Scalars("isl/train_loss")
    assert [p.step for p in points] == [r["steps"] for r in records] == [6, 12, 18, 24, 30, 36]
    assert [p.value for p in points] == pytest.approx([r["train_loss"] for r in records], rel=1e-6)


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path, teacher, reference):
    out = tmp_path / "run"
    killed = _run(_args(out, teacher), {"KDSEQ_TEST_KILL_AT_STEP": "27"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    latest = out / "checkpoint.pt"
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    latest.write_bytes(bytes(data))
    resumed = _run(_args(out, teacher) + ["--resume"])
    assert "falling back to the previous checkpoint" in resumed.stdout
    _assert_identical(reference, out)


def test_sigterm_checkpoints_and_exits_zero(tmp_path, teacher, reference):
    out = tmp_path / "run"
    stopped = _run(_args(out, teacher), {"KDSEQ_TEST_SIGTERM_AT_STEP": "10"})
    assert "SIGTERM" in stopped.stdout and "--resume" in stopped.stdout
    assert "SIGTERM: stopping after the current step or pass" in stopped.stderr  # said at once
    state = load_checkpoint(str(out / "checkpoint.pt"))
    assert state["progress"]["global_step"] == 10
    _run(_args(out, teacher) + ["--resume"])
    _assert_identical(reference, out)


def test_sigterm_at_an_epoch_end_keeps_the_older_fallback(tmp_path, teacher, reference):
    # The epoch's own checkpoint was written a second time for the preemption, which rotated it
    # into checkpoint.prev.pt: the fallback then held the same state, not an older one.
    out = tmp_path / "run"
    stopped = _run(_args(out, teacher), {"KDSEQ_TEST_SIGTERM_AT_EPOCH_END": "1"})
    assert "SIGTERM" in stopped.stdout
    latest = load_checkpoint(str(out / "checkpoint.pt"))["progress"]
    previous = load_checkpoint(str(out / "checkpoint.prev.pt"))["progress"]
    assert (latest["epoch"], latest["batch"], latest["global_step"]) == (1, 0, 6)
    assert previous["global_step"] == 4  # the interval checkpoint before it
    _run(_args(out, teacher) + ["--resume"])
    _assert_identical(reference, out)


def test_resume_with_different_config_is_an_error(tmp_path, teacher, capsys):
    out = tmp_path / "run"
    killed = _run(_args(out, teacher), {"KDSEQ_TEST_KILL_AT_STEP": "5"}, check=False)
    assert killed.returncode == -signal.SIGKILL
    rc = cli.main(_args(out, teacher, ["optim.lr=0.2"]) + ["--resume"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "optim.lr" in err


# ----------------------------------------------------------------------------- checkpoint files
def test_checkpoint_roundtrip_and_corruption(tmp_path):
    state = {"a": torch.arange(5), "b": {"c": 1.5}}
    save_checkpoint(state, str(tmp_path))
    save_checkpoint({"a": torch.arange(6), "b": {"c": 2.5}}, str(tmp_path))
    got, path = load_latest_checkpoint(str(tmp_path))
    assert path.endswith("checkpoint.pt") and torch.equal(got["a"], torch.arange(6))
    # Truncation of the latest is detected; the previous generation is used.
    latest = tmp_path / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(str(latest))
    logs = []
    got, path = load_latest_checkpoint(str(tmp_path), log=logs.append)
    assert path.endswith("checkpoint.prev.pt") and torch.equal(got["a"], torch.arange(5))
    assert "falling back" in logs[0]
    (tmp_path / "checkpoint.prev.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_latest_checkpoint(str(tmp_path))
    assert load_latest_checkpoint(str(tmp_path / "empty")) is None


# ----------------------------------------------------------------------------- non-finite guard
def test_nonfinite_loss_stops_with_step_phase_and_indices(tmp_path, teacher, capsys):
    out = tmp_path / "run"
    rc = cli.main(_args(out, teacher, ["optim.lr=1.0e+30", "optim.lr_decay_epochs=[]"]))
    err = capsys.readouterr().err
    assert rc == 3
    assert "non-finite" in err and "step" in err and "phase 0" in err and "indices [" in err
    state = load_checkpoint(str(out / "checkpoint.pt"))
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nonfinite_skip_mode_finishes(tmp_path, teacher, capsys, monkeypatch):
    # The odd bad batch (here: steps 3 and 8 see NaN images) is skipped and the run finishes.
    from kdseq_fast.step import DeviceStep

    run, calls = DeviceStep.run, []

    def poisoned(self, batch, *args, **kwargs):
        calls.append(1)
        if len(calls) in (3, 8):
            batch = dict(batch, images=torch.full_like(batch["images"], float("nan")))
        return run(self, batch, *args, **kwargs)

    monkeypatch.setattr(DeviceStep, "run", poisoned)
    out = tmp_path / "run"
    rc = cli.main(_args(out, teacher, ["optim.epochs=2", "optim.lr_decay_epochs=[]", "curriculum.num_phases=0",
                                       "curriculum.final_full_epochs=1", "train.nonfinite=skip"]))
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "batch skipped" in captured.out and "2 batches skipped as non-finite" in captured.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"]["isl"]["skipped_batches"] == 2


# ----------------------------------------------------------------------------- bad inputs
def test_missing_dataset_files_name_download(tmp_path, capsys):
    rc = cli.main(["train-teacher", "--out", str(tmp_path / "t"), "--quiet",
                   "--set", "data.name=cifar10", "--set", f"data.root={tmp_path / 'nodata'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "download" in err


def test_teacher_that_does_not_fit_names_keys(tmp_path, teacher, capsys):
    rc = cli.main(_args(tmp_path / "run", teacher, ["teacher.arch=resnet14"]))
    err = capsys.readouterr().err
    assert rc == 2
    assert "does not fit teacher.arch=resnet14" in err and "layer" in err


def test_teacher_with_wrong_class_count(tmp_path, teacher, capsys):
    rc = cli.main(_args(tmp_path / "run", teacher, ["data.synthetic_classes=7"]))
    err = capsys.readouterr().err
    assert rc == 2 and "fc" in err


@pytest.mark.parametrize("override,field", [
    ("optim.lr=-0.1", "optim.lr"),
    ("curriculum.start_frac=0", "curriculum.start_frac"),
    ("curriculum.full_at=1.5", "curriculum.full_at"),
    ("curriculum.measure=loss", "curriculum.measure"),
])
def test_out_of_range_config_values(tmp_path, teacher, capsys, override, field):
    rc = cli.main(_args(tmp_path / "run", teacher, [override]))
    err = capsys.readouterr().err
    assert rc == 2 and field in err
    assert not os.path.exists(tmp_path / "run")


def test_out_dir_holding_a_different_run(tmp_path, teacher, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"role": "student", "method": "kd",
                                              "resume_hash": "0" * 64}))
    rc = cli.main(_args(out, teacher))
    err = capsys.readouterr().err
    assert rc == 2 and "different run" in err


def test_rng_state_roundtrip_through_a_checkpoint(tmp_path):
    import random

    from kdseq_fast.runtime import capture_rng_state, restore_rng_state

    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    np.random.normal()  # leaves a cached Gaussian in the legacy state
    save_checkpoint({"rng": capture_rng_state()}, str(tmp_path))
    first = (random.random(), np.random.normal(), torch.rand(3))
    restore_rng_state(load_checkpoint(str(tmp_path / "checkpoint.pt"))["rng"])
    second = (random.random(), np.random.normal(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_run_written_before_a_new_config_field_still_resumes(tmp_path):
    # A field added to the package later (here: removed from the stored config and the run's
    # identity hash recomputed without it, as an older version wrote them) takes its default, or
    # the value that reproduces what the run did where the default has changed since:
    # curriculum.mix_frac came in at 0 and became 0.2 later.
    import json

    import yaml

    from kdseq_fast.config import config_hash, load_config
    from kdseq_fast.run_dir import RESUME_IGNORED_KEYS, RunDirError, RunDirectory, is_complete, same_run_config

    today = load_config(None, ["data.name=digits", "device=cpu"])
    cfg = load_config(None, ["data.name=digits", "device=cpu", "curriculum.mix_frac=0"])
    old = cfg.to_dict()
    del old["train"]["cuda_graphs"]
    del old["curriculum"]["mix_frac"]
    assert same_run_config(old, cfg)
    assert not same_run_config(old, today, "isl")  # an old isl run did no easy-first mixing
    assert same_run_config(old, today, "kd")  # kd never reads the curriculum
    changed = json.loads(json.dumps(old))
    changed["optim"]["lr"] = 0.5
    assert not same_run_config(changed, cfg)
    renamed = json.loads(json.dumps(old))
    renamed["train"]["no_such_field"] = 1
    assert not same_run_config(renamed, cfg)

    run = RunDirectory(str(tmp_path / "r"))
    os.makedirs(run.path)
    with open(run.file("config.yaml"), "w") as fh:
        yaml.safe_dump(old, fh)
    with open(run.file("run.json"), "w") as fh:
        json.dump({"role": "student", "method": "isl",
                   "resume_hash": config_hash(old, exclude=RESUME_IGNORED_KEYS)}, fh)
    run.check(cfg, "student", "isl", resume=True, overwrite=False)  # accepted
    with pytest.raises(RunDirError, match="optim.lr"):
        run.check(load_config(None, ["data.name=digits", "device=cpu", "optim.lr=0.5"]), "student", "isl",
                  resume=True, overwrite=False)
    assert not is_complete(run.path, "student", "isl", cfg)  # no checkpoint: not finished


def test_curriculum_settings_are_not_part_of_a_ce_or_kd_run(tmp_path):
    # ce and kd never read the curriculum section: a kd run stays the same run when a curriculum
    # default changes (an ablation reuses its kd baseline), while an isl run does not.
    import json

    import yaml

    from kdseq_fast.config import load_config
    from kdseq_fast.run_dir import RunDirError, RunDirectory, config_diff, resume_hash, same_run_config

    base = load_config(None, ["data.name=digits", "device=cpu", "curriculum.mix_frac=0.0"])
    mixed = load_config(None, ["data.name=digits", "device=cpu", "curriculum.mix_frac=0.2"])
    for method in ("ce", "kd"):
        assert resume_hash(base, method) == resume_hash(mixed, method)
        assert same_run_config(base.to_dict(), mixed, method)
        assert config_diff(base.to_dict(), mixed.to_dict(), method=method) == []
    assert resume_hash(base, "isl") != resume_hash(mixed, "isl")
    assert not same_run_config(base.to_dict(), mixed, "isl")
    assert config_diff(base.to_dict(), mixed.to_dict(), method="isl") == [
        "curriculum.mix_frac (0.0 in the checkpoint, 0.2 now)"]
    # Other settings still count for kd.
    other_lr = load_config(None, ["data.name=digits", "device=cpu", "optim.lr=0.5"])
    assert resume_hash(base, "kd") != resume_hash(other_lr, "kd")

    for method in ("kd", "isl"):
        run = RunDirectory(str(tmp_path / method))
        os.makedirs(run.path)
        with open(run.file("config.yaml"), "w") as fh:
            yaml.safe_dump(base.to_dict(), fh)
        with open(run.file("run.json"), "w") as fh:  # the hash as a version without this rule wrote it
            json.dump({"role": "student", "method": method, "resume_hash": resume_hash(base)}, fh)
        if method == "kd":
            run.check(mixed, "student", method, resume=True, overwrite=False)  # accepted
        else:
            with pytest.raises(RunDirError, match="curriculum.mix_frac"):
                run.check(mixed, "student", method, resume=True, overwrite=False)


@pytest.mark.parametrize("lr, message", [
    ("1.0e+6", "the weights are non-finite"),   # an update overflows the weights
    ("1.0e+8", "every batch of epoch 2"),        # the weights stay finite, every later step is skipped
])
def test_skip_mode_still_stops_a_run_that_cannot_learn(tmp_path, lr, message, capsys):
    # train.nonfinite=skip skips the odd bad batch; it does not finish a run with non-finite weights
    # (exit 0 and an inf student.pt) or one whose every step is skipped.
    out = tmp_path / "run"
    args = _args(out, "unused", [f"optim.lr={lr}", "optim.lr_decay_epochs=[]", "train.nonfinite=skip"])
    args[args.index("--method") + 1] = "ce"
    del args[args.index("--teacher"):args.index("--teacher") + 2]
    assert cli.main(args) == 3
    assert message in capsys.readouterr().err
    assert not os.path.exists(out / "student.pt")
    state = load_checkpoint(str(out / "checkpoint.pt"))
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_a_full_disk_names_the_file_and_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    save_checkpoint({"step": 1}, str(tmp_path))
    (tmp_path / ".checkpoint.pt.tmp.999999").write_bytes(b"left by a process killed mid-write")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=r"could not write .*checkpoint\.pt: No space left on device \(no space left "
                                      r"on the device: the files written before this one are intact"):
        save_checkpoint({"step": 2}, str(tmp_path))
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.pt"]  # no partial files, the old one intact
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == 1


@pytest.mark.parametrize("writer", ["atomic_write_bytes", "atomic_save", "save_config"])
def test_every_kept_file_is_written_whole_or_not_at_all(tmp_path, monkeypatch, writer):
    # The weights (atomic_save), config.yaml and the metrics/summaries/arrays share one protocol:
    # a full disk names the file and leaves the old one and no temporary file.
    import errno

    from kdseq_fast.atomic_files import atomic_write_bytes
    from kdseq_fast.checkpoint_io import atomic_save
    from kdseq_fast.config import load_config, save_config

    path = tmp_path / "kept"
    write = {"atomic_write_bytes": lambda v: atomic_write_bytes(str(v).encode(), str(path)),
             "atomic_save": lambda v: atomic_save({"v": v}, path),
             "save_config": lambda v: save_config(load_config(overrides=[f"seed={v}"]), path)}[writer]
    write(1)
    before = path.read_bytes()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match=r"could not write .*kept: No space left on device \(no space left"):
        write(2)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["kept"] and path.read_bytes() == before


def test_an_interrupted_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    from kdseq_fast.atomic_files import atomic_write

    path = tmp_path / "summary.json"
    path.write_bytes(b"old")

    def interrupted(fh):
        fh.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(path), interrupted)
    assert os.listdir(tmp_path) == ["summary.json"] and path.read_bytes() == b"old"


def test_cuda_rng_states_are_captured_and_restored(monkeypatch):
    # Checked without a GPU: the CUDA generators' states travel with the checkpoint and come back.
    from kdseq_fast import runtime

    saved = [torch.tensor([1, 2], dtype=torch.uint8), torch.tensor([3], dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: saved)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: restored.append(states))
    state = runtime.capture_rng_state()
    assert state["cuda"] is saved
    runtime.restore_rng_state(state)
    assert restored == [saved]
