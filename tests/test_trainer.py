"""End-to-end trainer runs on the offline digits data: teacher training and a short ISL run."""
import json
import os

import numpy as np
import pytest
import torch

import kdseq_fast as kf
from kdseq_fast.config import load_config
from kdseq_fast.trainer import (Callback, ConsoleLogger, RunDirError, Trainer, steps_to_target, train_teacher)

# Digits: 1,437 training images -> 23 steps per epoch at batch 64. resnet8 on both sides keeps the
# whole file to a few hundred small steps.
BASE = [
    "data.name=digits", "data.augment=none", "data.loader_backend=torch", "data.num_threads=1",
    "teacher.arch=resnet8", "teacher.epochs=5", "teacher.lr=0.1", "student.arch=resnet8",
    "optim.epochs=6", "optim.lr=0.1", "optim.lr_decay_epochs=[5]",
    "curriculum.warmup_epochs=2", "curriculum.num_phases=2", "curriculum.final_full_epochs=2",
    "train.tensorboard=false", "device=cpu",
]


# Two steps of resnet8 on 64 synthetic 16 px images: for tests of how a run starts and stops.
ONE_EPOCH_SYNTHETIC = [
    "data.name=synthetic", "data.synthetic_train=64", "data.synthetic_test=32", "data.image_size=16",
    "data.loader_backend=torch", "data.num_threads=1", "data.augment=none", "teacher.arch=resnet8",
    "student.arch=resnet8", "optim.epochs=1", "optim.batch_size=32", "optim.lr_decay_epochs=[]",
    "train.tensorboard=false", "device=cpu",
]


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    cfg = load_config(None, BASE)
    return train_teacher(cfg, str(tmp_path_factory.mktemp("teacher")), quiet=True,
                         log=lambda m: None)


class ScoreCheck(Callback):
    """At each phase start, recompute a few scores directly with the fused kernel."""

    def __init__(self):
        self.checked = []

    def on_phase_start(self, trainer, phase, sequence, scores):
        batch = next(iter(trainer._score_loader()))
        model = trainer.model.eval()
        with torch.no_grad():
            logits = model(batch["images"])
        model.train()
        idx = batch["indices"]
        teacher_logits = trainer.teacher_train_logits()[idx]
        expect = kf.instance_scores(logits, batch["labels"], teacher_logits,
                                    temperature=trainer.cfg.loss.temperature)
        torch.testing.assert_close(scores[idx], expect.float(), rtol=1e-4, atol=1e-4)
        self.checked.append(phase)


@pytest.fixture(scope="module")
def isl_run(tmp_path_factory, teacher_run):
    cfg = load_config(None, BASE)
    out = str(tmp_path_factory.mktemp("isl"))
    check = ScoreCheck()
    trainer = Trainer(cfg, out, method="isl", teacher=teacher_run.weights_path, quiet=True,
                      callbacks=[check], log=lambda m: None)
    # Every batch the step trained on, in order (what the loader really delivered).
    check.batches = []
    run = trainer.step.run

    def recording_run(batch, *args, **kwargs):
        check.batches.append(batch["indices"].cpu().numpy().copy())
        return run(batch, *args, **kwargs)

    trainer.step.run = recording_run
    check.epochs = []
    set_epoch = trainer.train_loader.set_epoch

    def recording_set_epoch(e):
        check.epochs.append(e)
        return set_epoch(e)

    trainer.train_loader.set_epoch = recording_set_epoch
    result = trainer.fit()
    return trainer, result, check


def test_teacher_training_outputs(teacher_run):
    out = teacher_run.out_dir
    for name in ("teacher.pt", "teacher_best.pt", "metrics.jsonl", "summary.json",
                 "checkpoint.pt", "config.yaml", "run.json", "accuracy_vs_steps.png"):
        assert os.path.exists(os.path.join(out, name)), name
    t = teacher_run.summary["teacher"]
    assert 0.8 <= t["test_acc"] <= 1.0
    assert t["steps"] == 5 * 23
    state = torch.load(teacher_run.weights_path, weights_only=True)
    assert "fc.weight" in state and state["fc.weight"].shape[0] == 10


def test_isl_run_writes_every_output(isl_run):
    trainer, result, check = isl_run
    out = result.out_dir
    for name in ("metrics.jsonl", "phase_1_order.npy", "phase_1_scores.npy", "phase_2_order.npy",
                 "phase_2_scores.npy", "checkpoint.pt", "student.pt", "summary.json",
                 "accuracy_vs_steps.png", "pacing.png", "difficulty_hist.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        records = [json.loads(line) for line in fh]
    assert [r["epoch"] for r in records] == list(range(1, 7))
    assert [r["phase"] for r in records] == [0, 0, 1, 2, 3, 3]
    for key in ("method", "phase", "epoch", "steps", "lr", "train_loss", "test_acc",
                "admitted_frac", "images_per_s", "wall_s", "time_data", "time_model",
                "time_loss", "time_scoring"):
        assert key in records[0], key
    assert records[-1]["steps"] == 6 * 23
    assert records[2]["admitted_frac"] < 1.0 and records[0]["admitted_frac"] == 1.0
    assert records[2]["time_scoring"] > 0 and records[0]["time_scoring"] == 0
    assert records[-1]["lr"] == pytest.approx(0.01)
    # The LR each epoch trained with: decayed once, at optim.lr_decay_epochs=[5].
    assert [r["lr"] for r in records] == pytest.approx([0.1] * 5 + [0.01])
    summary = json.loads(open(os.path.join(out, "summary.json")).read())
    m = summary["methods"]["isl"]
    assert set(m) >= {"test_acc", "best_acc", "steps", "steps_to_target", "wall_s"}
    assert 0.0 <= m["test_acc"] <= m["best_acc"] <= 1.0
    assert 0.0 < summary["teacher"]["test_acc"] <= 1.0


def test_isl_scores_with_the_kernel_and_orders_change(isl_run):
    trainer, result, check = isl_run
    assert check.checked == [1, 2]
    out = result.out_dir
    o1, o2 = (np.load(os.path.join(out, f"phase_{k}_order.npy")) for k in (1, 2))
    s1 = np.load(os.path.join(out, "phase_1_scores.npy"))
    n = trainer.num_items
    assert s1.shape == (n, len(kf.SCORE_FIELDS)) and s1.dtype == np.float32
    assert sorted(o1.tolist()) == list(range(n)) and sorted(o2.tolist()) == list(range(n))
    assert not np.array_equal(o1, o2)
    # Easy -> hard by the default measure (snapshot cross-entropy), ties by index.
    ce = s1[:, kf.SCORE_FIELDS.index("ce")]
    assert np.all(np.diff(ce[o1]) >= 0)


def test_isl_trains_on_the_admitted_prefix_of_each_phase_sequence(isl_run):
    # The batches the step trained on, against the phase's written sequence: in a curriculum
    # epoch, a batch holds instances ranked below its admitted count, but for the easy-first
    # mixing share. (admitted_frac and the pacing plot come from the counts, not the batches.)
    trainer, result, check = isl_run
    spe, n = trainer.steps_per_epoch, trainer.num_items
    assert len(check.batches) == len(trainer.schedule) * spe
    mix = trainer.cfg.curriculum.mix_frac
    curriculum_batches = outside_total = 0
    for e, (phase, kind, _, _) in enumerate(trainer.schedule):
        if kind != "curriculum":
            continue
        sequence = np.load(os.path.join(result.out_dir, f"phase_{phase}_order.npy"))
        rank = np.empty(n, dtype=np.int64)
        rank[sequence] = np.arange(n)
        _, admitted = trainer.plan.order(e, sequence)
        for j in range(spe):
            idx = check.batches[e * spe + j]
            outside = int((rank[idx] >= admitted[j]).sum())
            assert outside <= round(mix * len(idx)) + 1, (e, j, outside, int(admitted[j]), len(idx))
            assert len(np.unique(idx)) == len(idx)
            curriculum_batches += 1
            outside_total += outside
    assert curriculum_batches == 2 * spe and admitted[0] < n
    assert (outside_total > 0) == (mix > 0)  # the mixing share is there, and only with mixing


def test_every_epoch_draws_its_own_augmentation(isl_run):
    # The loader's epoch (its augmentation stream) is the run's epoch, not the epoch in a phase.
    trainer, _, check = isl_run
    assert check.epochs == list(range(len(trainer.schedule)))


def test_isl_reaches_sane_accuracy(isl_run):
    _, result, _ = isl_run
    assert result.summary["methods"]["isl"]["test_acc"] >= 0.7


def test_same_dir_without_resume_is_refused(isl_run, teacher_run):
    _, result, _ = isl_run
    cfg = load_config(None, BASE)
    with pytest.raises(RunDirError, match="--resume"):
        Trainer(cfg, result.out_dir, method="isl", teacher=teacher_run.weights_path, quiet=True)
    with pytest.raises(RunDirError, match=r"different run \(role student, method isl\), not role student, method kd"):
        Trainer(cfg, result.out_dir, method="kd", teacher=teacher_run.weights_path, quiet=True)


def test_kd_needs_a_teacher(tmp_path):
    cfg = load_config(None, BASE)
    with pytest.raises(ValueError, match="needs a teacher"):
        Trainer(cfg, str(tmp_path / "kd"), method="kd", quiet=True)


def test_a_module_teacher_for_other_data_is_refused_before_training(tmp_path):
    # A teacher module for other images or another class count failed at the first batch, inside
    # a convolution or the loss.
    from kdseq_fast.models import get_model

    cfg = load_config(None, BASE)  # digits: 3 channels, 32 px, 10 classes
    kw = dict(method="kd", quiet=True, log=lambda m: None)
    gray = get_model("resnet8", 10, image_size=32, in_channels=1)
    with pytest.raises(ValueError, match=r"teacher module fails on one 3x32x32 image of this data"):
        Trainer(cfg, str(tmp_path / "gray"), teacher=gray, **kw)
    hundred = get_model("resnet8", 100, image_size=32)
    with pytest.raises(ValueError, match=r"logits of shape \(batch, 10\).*returned \(1, 100\)"):
        Trainer(cfg, str(tmp_path / "hundred"), teacher=hundred, **kw)
    assert all(set(os.listdir(tmp_path / d)) <= {".lock"} for d in ("gray", "hundred"))  # as if never run
    # The right teacher passes, in train mode or not, and the probe leaves its BatchNorm alone.
    good = get_model("resnet8", 10, image_size=32).train()
    before = {k: v.clone() for k, v in good.state_dict().items()}
    Trainer(cfg, str(tmp_path / "good"), teacher=good, **kw)
    assert not good.training
    assert all(torch.equal(before[k], v) for k, v in good.state_dict().items())
    # A torch.compile'd teacher is probed through its original module: no compile of a batch of one.
    from torch._dynamo.utils import counters

    from kdseq_fast.run_inputs import probe_teacher_module

    frames = counters["frames"]["total"]
    probe_teacher_module(torch.compile(good), 10, 3, 32)
    assert counters["frames"]["total"] == frames


def test_steps_to_target():
    hist = [(10, 0.5), (20, 0.8), (30, 0.79), (40, 0.9)]
    assert steps_to_target(hist, 0.8) == 20
    assert steps_to_target(hist, 0.85) == 40
    assert steps_to_target(hist, 0.95) is None
    assert steps_to_target(hist, None) is None
    from kdseq_fast.reports import accuracy_target

    # train.target_acc may be a percentage.
    assert accuracy_target(91.5) == pytest.approx(0.915) and accuracy_target(0.5) == 0.5
    assert accuracy_target(None) is None


def test_schedule_and_pacing_curve(isl_run):
    trainer, _, _ = isl_run
    phases = [p for p, *_ in trainer.schedule]
    assert phases == [0, 0, 1, 2, 3, 3]
    # Each curriculum phase paces on its own (one epoch each here) and reaches the full set.
    assert trainer.schedule[2] == (1, "curriculum", 0, 1) and trainer.schedule[3] == (2, "curriculum", 0, 1)
    steps, frac = trainer.pacing_curve()
    assert frac[3 * 23 - 1] == 1.0 and frac[4 * 23 - 1] == 1.0
    assert len(steps) == 6 * 23 and steps[0] == 1
    in_phase1 = frac[2 * 23:3 * 23]
    assert in_phase1[0] == pytest.approx(np.ceil(0.2 * trainer.num_items) / trainer.num_items)
    assert np.all(np.diff(in_phase1) >= 0) and frac[-1] == 1.0


def _one_batch(trainer, epoch=0):
    trainer.train_loader.set_order(trainer.plan.order(epoch, None)[0])
    return next(iter(trainer.train_loader))


def test_nonfinite_step_leaves_no_trace_and_the_next_step_is_a_first_step(tmp_path, teacher_run):
    # The device guard: a NaN batch changes neither weights nor BatchNorm statistics nor momentum,
    # and the step after it equals the first step of a run that never saw the bad batch (fused SGD
    # would otherwise read uninitialized momentum buffers after a skipped first step).
    cfg = load_config(None, BASE)
    a = Trainer(cfg, str(tmp_path / "a"), method="kd", teacher=teacher_run.weights_path, quiet=True,
                log=lambda m: None)
    b = Trainer(cfg, str(tmp_path / "b"), method="kd", teacher=teacher_run.weights_path, quiet=True,
                log=lambda m: None)
    for t in (a, b):
        t.teacher_train_logits()
    batch = _one_batch(a)
    before = {k: v.clone() for k, v in a.model.state_dict().items()}
    bad = dict(batch, images=batch["images"].clone().fill_(float("nan")))
    a.step.run(bad)
    r = a.step.fold()
    assert r.bad_steps == 1 and r.first_bad == 1 and r.samples == 0 and r.loss_sum == 0.0
    assert all(torch.equal(before[k], v) for k, v in a.model.state_dict().items())
    a.step.run(batch)
    b.step.run(batch)
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in a.model.state_dict().items())
    good = a.step.fold()
    assert good.bad_steps == 0 and good.samples == batch["labels"].numel()


@pytest.mark.parametrize("augment", ["none", "cifar"])
def test_kd_step_trains_on_the_configured_kd_loss(tmp_path, teacher_run, augment):
    # What a kd step backpropagates is Hinton's loss with the config's T and weights, against the
    # teacher's logits for those very images: cached for un-augmented data, the teacher online for
    # augmented batches (every other trainer test compares the trainer with itself).
    import copy

    cfg = load_config(None, BASE + [f"data.augment={augment}", "loss.temperature=3.0",
                                    "loss.kd_weight=0.7", "loss.ce_weight=0.3"])
    t = Trainer(cfg, str(tmp_path / "kd"), method="kd", teacher=teacher_run.weights_path, quiet=True,
                log=lambda m: None)
    t.teacher_train_logits()
    assert t.step.use_cached == (augment == "none")
    batch = _one_batch(t)
    student = copy.deepcopy(t.model).train()  # the same forward, without touching the run's BN state
    with torch.no_grad():
        logits = student(batch["images"])
        if augment == "none":
            teacher = t.teacher_train_logits()[batch["indices"]]
        else:
            teacher = t.step.teacher(batch["images"])
            # Not the cached logits of the un-augmented images: the online teacher sees the crop.
            assert not torch.allclose(teacher, t.teacher_train_logits()[batch["indices"]])
    expect = kf.kd_loss_reference(logits.double(), teacher.double(), batch["labels"], temperature=3.0,
                                  kd_weight=0.7, ce_weight=0.3)
    got = t.step.run(batch)
    assert float(got) == pytest.approx(float(expect), rel=1e-5)
    ce = torch.nn.functional.cross_entropy(logits.double(), batch["labels"])
    assert abs(float(got) - float(ce)) > 1e-3  # the two losses this test tells apart


def test_device_counters_match_the_host_loss(tmp_path, teacher_run):
    cfg = load_config(None, BASE)
    t = Trainer(cfg, str(tmp_path / "c"), method="kd", teacher=teacher_run.weights_path, quiet=True,
                log=lambda m: None)
    t.teacher_train_logits()
    t.train_loader.set_order(t.plan.order(0, None)[0])
    losses, n = [], 0
    for _, batch in zip(range(3), t.train_loader):
        losses.append(float(t.step.run(batch)) * batch["labels"].numel())
        n += batch["labels"].numel()
    r = t.step.fold()
    assert r.samples == n and r.bad_steps == 0 and r.first_bad == -1
    assert r.loss_sum == pytest.approx(sum(losses), rel=1e-6)
    assert 0 <= r.correct <= n


def test_auto_settings_per_device():
    from kdseq_fast.trainer import resolve_train_settings

    cfg = load_config(None, BASE)
    cpu = resolve_train_settings(cfg, torch.device("cpu"))
    assert cpu["amp"] == "none" and cpu["log_every_steps"] == 1 and cpu["fused_optimizer"] is True
    assert cpu["compile"] is False and cpu["channels_last"] is True
    det = resolve_train_settings(load_config(None, BASE + ["deterministic=true"]), torch.device("cpu"))
    assert det["channels_last"] is False
    forced = resolve_train_settings(load_config(None, BASE + ["train.log_every_steps=7",
                                                              "train.channels_last=false"]),
                                    torch.device("cpu"))
    assert forced["log_every_steps"] == 7 and forced["channels_last"] is False
    assert cpu["cuda_graphs"] is False  # auto: CUDA only
    with pytest.raises(ValueError, match="train.cuda_graphs.*CUDA device"):
        resolve_train_settings(load_config(None, BASE + ["train.cuda_graphs=true"]), torch.device("cpu"))
    with pytest.raises(ValueError, match="train.cuda_graphs.*single process"):
        resolve_train_settings(load_config(None, BASE + ["train.cuda_graphs=true"]), torch.device("cuda"),
                               distributed=True)
    with pytest.raises(ValueError, match="train.cuda_graphs.*reduce-overhead"):
        resolve_train_settings(load_config(None, BASE + ["train.cuda_graphs=true", "train.compile=true",
                                                         "train.compile_mode=reduce-overhead"]),
                               torch.device("cuda"))
    with pytest.raises(ValueError, match="train.cuda_graphs.*fused_optimizer"):
        resolve_train_settings(load_config(None, BASE + ["train.cuda_graphs=true", "train.fused_optimizer=false"]),
                               torch.device("cuda"))
    cuda = torch.device("cuda")
    assert resolve_train_settings(cfg, cuda)["cuda_graphs"] is True
    assert resolve_train_settings(load_config(None, BASE + ["deterministic=true"]), cuda)["cuda_graphs"] is False
    compiled = load_config(None, BASE + ["train.compile=true"])
    assert resolve_train_settings(compiled, cuda)["cuda_graphs"] is False  # auto: not measured compiled
    both = load_config(None, BASE + ["train.compile=true", "train.cuda_graphs=true"])
    assert resolve_train_settings(both, cuda)["cuda_graphs"] is True


@pytest.mark.slow
def test_compiled_training_matches_eager_and_reports_compile_time(tmp_path, teacher_run):
    # torch.compile of the student and teacher (train.compile=true) runs through the same device
    # step: flat BatchNorm buffers, fused SGD, the device guard. One step from the same weights
    # matches the eager step (inductor's numerics: ~1e-5; training diverges chaotically later, so
    # end accuracies are not compared), and a short run learns and reports its compile time.
    short = ["optim.epochs=2", "optim.lr_decay_epochs=[1]", "curriculum.warmup_epochs=1",
             "curriculum.num_phases=0", "curriculum.final_full_epochs=1", "data.augment=none"]
    after = {}
    for compiled in (False, True):
        cfg = load_config(None, BASE + short + [f"train.compile={str(compiled).lower()}"])
        t = Trainer(cfg, str(tmp_path / f"step{compiled}"), method="kd", teacher=teacher_run.weights_path,
                    quiet=True, log=lambda m: None)
        t.teacher_train_logits()
        t.step.run(_one_batch(t))
        after[compiled] = {k: v.clone() for k, v in t.model.state_dict().items()}
        if compiled:
            res = t.fit()
    for k, v in after[True].items():
        torch.testing.assert_close(v, after[False][k], atol=1e-3, rtol=1e-3, msg=lambda m: f"{k}: {m}")
    with open(os.path.join(res.out_dir, "metrics.jsonl")) as fh:
        records = [json.loads(line) for line in fh]
    assert records[0]["time_compile"] > 0 and records[1]["time_compile"] == 0
    assert res.summary["methods"]["kd"]["test_acc"] > 0.3


class _FakeGraph:
    """torch.cuda's graph API on the CPU: "capture" records the step, "replay" runs it again on
    the static buffers (what a real replay does, minus the launches)."""

    def __init__(self):
        self.fn = None

    def replay(self):
        self.fn()


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_step_graphs_bookkeeping_with_a_fake_graph_api(tmp_path, teacher_run, monkeypatch, compiled):
    # StepGraphs' decisions (warm-up, capture, replay, recapture on a new learning rate, eager
    # partial batches, a resumed run whose first batch is the partial one) on the CPU, with the
    # CUDA graph calls replaced; the result must equal the eager step's, also for a compiled step
    # (train.compile with train.cuda_graphs). The real capture is checked against eager on a GPU
    # by tests/test_cuda_training.py.
    import contextlib

    import kdseq_fast.step as step_mod

    class Stream:
        def __init__(self, device=None):
            pass

        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())

    def fake_capture(self, images, labels, indices, key):
        s = self.step
        self.static = {"images": images.clone(), "labels": labels.clone(),
                       "indices": None if indices is None else indices.clone()}
        self.out = torch.zeros((), dtype=torch.float32)
        g = _FakeGraph()
        g.fn = lambda: self.out.copy_(s._compute(self.static["images"], self.static["labels"],
                                                 self.static["indices"]))
        self.graph, self.key = g, key
        self.captures += 1

    monkeypatch.setattr(step_mod.StepGraphs, "_capture", fake_capture)
    results = {}
    for graphed in (False, True):
        cfg = load_config(None, BASE + ["deterministic=true", f"train.compile={str(compiled).lower()}"])
        t = Trainer(cfg, str(tmp_path / str(graphed)), method="kd", teacher=teacher_run.weights_path,
                    quiet=True, log=lambda m: None)
        if graphed:
            t.step.graphs = step_mod.StepGraphs(t.step)
        t.teacher_train_logits()
        t.train_loader.set_order(t.plan.order(0, None)[0])
        batches = list(t.train_loader)
        assert batches[-1]["labels"].numel() < batches[0]["labels"].numel()
        # Starts like a run resumed at the partial last batch, then full batches, an LR change.
        for i, b in enumerate([batches[-1]] + batches[:10]):
            if i == 7:
                for g in t.optimizer.param_groups:
                    g["lr"] *= 0.1
            t.step.run(b)
        results[graphed] = (t.step.fold(), {k: v.clone() for k, v in t.model.state_dict().items()}, t.step.graphs)
    (r0, s0, _), (r1, s1, g) = results[False], results[True]
    # partial first (taken as the shape, then replaced by the full batch: warm-up again),
    # 3 warm-up steps, capture at step 5, recapture at the LR change; replays = 10 - 3.
    assert (g.captures, g.replays) == (2, 7)
    assert (r1.samples, r1.correct, r1.bad_steps) == (r0.samples, r0.correct, r0.bad_steps)
    assert r1.loss_sum == pytest.approx(r0.loss_sum, rel=1e-9)
    for k in s0:
        torch.testing.assert_close(s1[k], s0[k], rtol=0, atol=0, msg=lambda m: f"{k}: {m}")


def test_python_entry_points_in_runs_module(tmp_path, teacher_run):
    # README: `from kdseq_fast.runs import distill` returns the TrainResult the CLI prints from; a
    # finished run asked again with resume is returned as it is. The trainer module keeps the names.
    import kdseq_fast.trainer as trainer_mod
    from kdseq_fast import runs

    assert trainer_mod.distill is runs.distill and trainer_mod.compare is runs.compare
    cfg = load_config(None, BASE + ["optim.epochs=3", "optim.lr_decay_epochs=[2]", "curriculum.warmup_epochs=1",
                                    "curriculum.num_phases=1", "curriculum.final_full_epochs=1"])
    res = runs.distill(cfg, str(tmp_path / "kd"), method="kd", teacher=teacher_run.weights_path, quiet=True,
                       log=lambda m: None)
    assert os.path.exists(res.weights_path) and 0.0 <= res.summary["methods"]["kd"]["test_acc"] <= 1.0
    messages = []
    again = runs.distill(cfg, str(tmp_path / "kd"), method="kd", teacher=teacher_run.weights_path, resume=True,
                         quiet=True, log=messages.append)
    assert again.summary == res.summary and any("already complete" in m for m in messages)


def test_a_gpu_the_kernels_cannot_run_on_stops_a_run_before_any_work(tmp_path, teacher_run, monkeypatch):
    # kdseq_fast._extension.check_cuda_kernels raises when the build has no code for the run's GPU;
    # here it raises for every device, to see where each entry point asks: before the data, the
    # teacher or a run directory, and only for methods that launch the kernels.
    from kdseq_fast import runs, scoring
    import kdseq_fast.trainer as trainer_mod

    asked = []

    def refuse(device):
        asked.append(torch.device(device))
        raise RuntimeError("no kernels for this GPU")

    for mod in (runs, scoring, trainer_mod):
        monkeypatch.setattr(mod, "check_cuda_kernels", refuse)
    cfg = load_config(None, BASE)
    with pytest.raises(RuntimeError, match="no kernels"):
        runs.compare(cfg, str(tmp_path / "cmp"), methods=("ce", "kd"), quiet=True, log=lambda m: None)
    assert not os.path.exists(tmp_path / "cmp" / "teacher")
    with pytest.raises(RuntimeError, match="no kernels"):
        Trainer(cfg, str(tmp_path / "kd"), method="kd", teacher=teacher_run.weights_path, quiet=True)
    assert not os.path.exists(tmp_path / "kd")
    with pytest.raises(RuntimeError, match="no kernels"):
        scoring.score_dataset(torch.nn.Linear(4, 3), [], num_items=1, progress=False)
    assert asked == [torch.device("cpu")] * 3
    # Cross-entropy runs launch no kernel of this package and are not asked about.
    short = load_config(None, BASE + ["optim.epochs=3", "optim.lr_decay_epochs=[2]", "curriculum.warmup_epochs=1",
                                      "curriculum.num_phases=1", "curriculum.final_full_epochs=1"])
    runs.compare(short, str(tmp_path / "ce"), methods=("ce",), quiet=True, log=lambda m: None)
    assert len(asked) == 3


def test_a_shorter_teacher_schedule_keeps_every_lr_decay(tmp_path):
    # 150/180/210 of 240 epochs scaled to 6 land on 3.75, 4.5 and 5.25: two of them on epoch 5.
    # A set once merged those, and epoch 5 ran at 10x the intended LR.
    cfg = load_config(None, [s for s in BASE if not s.startswith(("optim.", "teacher.epochs"))]
                      + ["teacher.epochs=6"])
    assert list(cfg.optim.lr_decay_epochs) == [150, 180, 210] and cfg.optim.epochs == 240
    t = Trainer(cfg, str(tmp_path / "t"), role="teacher", quiet=True, log=lambda m: None)
    assert t.milestones == [4, 5, 5]
    lrs = []
    for _ in range(6):
        lrs.append(t.lr)
        t.scheduler.step()
    base, g = t.base_lr, cfg.optim.lr_decay_rate
    assert lrs == pytest.approx([base] * 4 + [base * g, base * g ** 3])


def test_fp16_loss_scale_overflows_are_skipped_quietly_but_a_nan_loss_still_stops(tmp_path, teacher_run):
    # GradScaler's rule: once the scale has grown, scaled fp16 gradients overflow about once a
    # growth interval; that step is skipped and the scale halved. It once counted as a non-finite
    # step, so the default train.nonfinite=stop ended every long fp16 run.
    cfg = load_config(None, BASE + ["train.amp=fp16"])
    t = Trainer(cfg, str(tmp_path / "fp16"), method="kd", teacher=teacher_run.weights_path, quiet=True,
                log=lambda m: None)
    t.teacher_train_logits()
    batch = _one_batch(t)
    t.step.scaler.scale.fill_(2.0 ** 40)  # far beyond fp16: the scaled gradients overflow
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    t.step.run(batch)
    r = t.step.fold()
    assert (r.bad_steps, r.first_bad, r.scale_skips, r.samples) == (0, -1, 1, 0)
    assert all(torch.equal(before[k], v) for k, v in t.model.state_dict().items())
    assert float(t.step.scaler.scale) == 2.0 ** 39
    t.rejected.add_read(r)
    assert t.rejected.take() is None  # nothing to report: train.nonfinite does not apply
    # A non-finite loss is a non-finite step at any scale.
    t.step.run(dict(batch, images=batch["images"].clone().fill_(float("nan"))))
    r = t.step.fold()
    assert (r.bad_steps, r.scale_skips) == (1, 0)
    # Gradients that overflow even at a scale of at most 1 are one too.
    t.step.scaler.scale.fill_(1.0)
    t.step.params[0].register_hook(lambda g: torch.full_like(g, float("inf")))
    t.step.run(batch)
    r = t.step.fold()
    assert (r.bad_steps, r.scale_skips) == (1, 0)


def test_an_fp16_run_whose_scale_overflows_finishes_and_counts_the_skips(tmp_path, monkeypatch):
    from kdseq_fast import step as step_module

    init = step_module.DynamicLossScale.__init__

    def grown_scale(self, device, enabled, init_scale=2.0 ** 16, **kw):
        init(self, device, enabled, init_scale=2.0 ** 24, **kw)  # as after 8 growth intervals

    monkeypatch.setattr(step_module.DynamicLossScale, "__init__", grown_scale)
    cfg = load_config(None, ["data.name=synthetic", "data.synthetic_train=128", "data.synthetic_test=32",
                             "data.image_size=16", "data.loader_backend=torch", "data.num_threads=1",
                             "student.arch=resnet8", "optim.epochs=1", "optim.batch_size=16",
                             "optim.lr_decay_epochs=[]", "curriculum.warmup_epochs=0", "curriculum.num_phases=1",
                             "curriculum.final_full_epochs=0", "train.tensorboard=false", "device=cpu",
                             "train.amp=fp16"])
    res = Trainer(cfg, str(tmp_path / "run"), method="ce", quiet=True, log=lambda m: None).fit()
    assert res.summary["methods"]["ce"]["skipped_batches"] == 0
    with open(os.path.join(res.out_dir, "metrics.jsonl")) as fh:
        (record,) = [json.loads(line) for line in fh]
    assert 1 <= record["loss_scale_skips"] < 8  # halved until the scaled gradients fit in fp16


def test_curriculum_order_setting_reaches_the_sequence(tmp_path, teacher_run):
    # curriculum.order=anti sorts the phase's sequence hard -> easy by the measure.
    cfg = load_config(None, BASE + ["optim.epochs=3", "optim.lr_decay_epochs=[2]", "curriculum.warmup_epochs=1",
                                    "curriculum.num_phases=1", "curriculum.final_full_epochs=1",
                                    "curriculum.order=anti"])
    res = Trainer(cfg, str(tmp_path / "anti"), method="isl", teacher=teacher_run.weights_path, quiet=True,
                  log=lambda m: None).fit()
    order = np.load(os.path.join(res.out_dir, "phase_1_order.npy"))
    ce = np.load(os.path.join(res.out_dir, "phase_1_scores.npy"))[:, kf.SCORE_FIELDS.index("ce")]
    assert np.all(np.diff(ce[order]) <= 0)


def test_a_config_loaded_for_the_baselines_is_refused_for_isl_before_any_work(tmp_path):
    # load_config(methods=("ce", "kd")) skips the curriculum's epoch accounting; the library's
    # isl entry points check it themselves before the directory is touched or a teacher trains.
    from kdseq_fast.runs import compare

    cfg = load_config(None, BASE + ["optim.epochs=3", "optim.lr_decay_epochs=[]"], methods=("ce", "kd"))
    with pytest.raises(ValueError, match="epoch accounting"):
        Trainer(cfg, str(tmp_path / "isl"), method="isl", quiet=True, log=lambda m: None)
    with pytest.raises(ValueError, match="epoch accounting"):
        compare(cfg, str(tmp_path / "cmp"), methods=["ce", "isl"], quiet=True, log=lambda m: None)
    assert not (tmp_path / "isl").exists() and not (tmp_path / "cmp").exists()


def test_bad_trainer_arguments_are_named_before_any_work(tmp_path, monkeypatch):
    cfg = load_config(None, BASE)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="out_dir must be a non-empty path"):  # trained into the cwd
        Trainer(cfg, "", method="ce", quiet=True, log=lambda m: None)
    with pytest.raises(ValueError, match="out_dir must be a non-empty path"):
        Trainer(cfg, None, method="ce", quiet=True, log=lambda m: None)
    for callbacks in (ConsoleLogger(), [object()], "console"):
        with pytest.raises(TypeError, match="callbacks must be a list of kdseq_fast.callbacks.Callback"):
            Trainer(cfg, str(tmp_path / "cb"), method="ce", quiet=True, log=lambda m: None, callbacks=callbacks)
    with pytest.raises(ValueError, match="teacher must be a torch.nn.Module or a checkpoint path"):
        Trainer(cfg, str(tmp_path / "kd"), method="kd", teacher="", quiet=True, log=lambda m: None)
    # A Config changed after loading is validated again (a str batch size failed deep inside).
    cfg.optim.batch_size = "8"
    with pytest.raises(ValueError, match="optim.batch_size"):
        Trainer(cfg, str(tmp_path / "bs"), method="ce", quiet=True, log=lambda m: None)
    assert os.listdir(tmp_path) == []


def test_a_signal_while_the_results_are_written_stops_compare_before_the_next_method(tmp_path, monkeypatch):
    # SIGTERM landing in _finish (student.pt, summary, plots) was honoured by no one: compare
    # went on to train the next method, which a preemption's SIGKILL would then cut short.
    import signal

    from kdseq_fast import trainer as trainer_mod
    from kdseq_fast.models import get_model
    from kdseq_fast.runs import compare

    cfg = load_config(None, ONE_EPOCH_SYNTHETIC, methods=("ce", "kd"))
    torch.manual_seed(1)
    teacher = tmp_path / "teacher.pt"
    torch.save(get_model("resnet8", 10, image_size=16).state_dict(), teacher)
    finish = trainer_mod.Trainer._finish

    def signalled_finish(self):
        if self.method == "ce":
            os.kill(os.getpid(), signal.SIGTERM)
        return finish(self)

    monkeypatch.setattr(trainer_mod.Trainer, "_finish", signalled_finish)
    out = tmp_path / "cmp"
    with pytest.raises(trainer_mod.Preempted, match="while writing the results") as info:
        compare(cfg, str(out), methods=["ce", "kd"], teacher=str(teacher), quiet=True, log=lambda m: None)
    assert info.value.result.summary["methods"]["ce"]["steps"] == 2
    assert (out / "ce" / "student.pt").exists() and not (out / "kd" / "student.pt").exists()
    monkeypatch.undo()
    summary = compare(cfg, str(out), methods=["ce", "kd"], teacher=str(teacher), resume=True, quiet=True,
                      log=lambda m: None)
    assert set(summary["methods"]) == {"ce", "kd"} and (out / "kd" / "student.pt").exists()


def test_a_signal_while_a_run_is_set_up_is_honoured_at_its_start(tmp_path, monkeypatch):
    # Only Trainer.fit turned signals into a stop: one while the data or the teacher was loaded
    # (minutes on real data), or between compare's methods, got the default action (exit 143
    # without a word, a KeyboardInterrupt traceback; under torchrun the whole job failed).
    import signal

    from kdseq_fast import run_inputs, runs
    from kdseq_fast.models import get_model
    from kdseq_fast.trainer import Preempted

    cfg = load_config(None, ONE_EPOCH_SYNTHETIC, methods=("kd",))
    teacher = tmp_path / "teacher.pt"
    torch.save(get_model("resnet8", 10, image_size=16).state_dict(), teacher)
    build = run_inputs.build_data

    def signalled_build(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return build(*args, **kwargs)

    monkeypatch.setattr(runs, "build_data", signalled_build)  # compare loads the data here
    out = tmp_path / "cmp"
    with pytest.raises(Preempted, match=r"\[teacher\] received SIGINT: checkpoint saved .* at step 0"):
        runs.compare(cfg, str(out), methods=["kd"], quiet=True, log=lambda m: None)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    monkeypatch.undo()
    summary = runs.compare(cfg, str(out), methods=["kd"], resume=True, quiet=True, log=lambda m: None)
    assert summary["methods"]["kd"]["steps"] == 2
    # A kd run stops before its teacher's passes (evaluation, the logit table: minutes on real data).
    monkeypatch.setattr(run_inputs, "build_data", signalled_build)
    monkeypatch.setattr(trainer_module(), "build_data", signalled_build)
    with pytest.raises(Preempted, match=r"\[kd\] received SIGINT: checkpoint saved .* at step 0"):
        runs.distill(cfg, str(tmp_path / "kd"), method="kd", teacher=str(teacher), quiet=True, log=lambda m: None)
    from kdseq_fast.runtime import load_checkpoint

    assert load_checkpoint(str(tmp_path / "kd" / "checkpoint.pt"))["teacher_acc"] is None
    assert not list((tmp_path / "kd").glob("cache/*.npy"))  # no logit pass
    monkeypatch.undo()
    done = runs.distill(cfg, str(tmp_path / "kd"), method="kd", teacher=str(teacher), resume=True, quiet=True,
                        log=lambda m: None)
    assert done.summary["methods"]["kd"]["steps"] == 2 and done.summary["teacher"]["test_acc"] is not None


def trainer_module():
    from kdseq_fast import trainer

    return trainer


def test_graceful_stops_nest_and_a_forwarded_copy_is_not_a_second_signal(monkeypatch):
    import signal

    from kdseq_fast.runtime import GracefulStop

    before = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as outer:
        with GracefulStop() as inner:
            assert inner is outer  # one flag for the whole command
        assert signal.getsignal(signal.SIGTERM) == outer._handle  # the inner exit kept the handlers
        # torchrun forwards the signal it got to every rank: the copy arrives ms after the first.
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "test")
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # escalated to the default action (death) before
        assert outer.requested == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before


def test_runs_sharing_a_tensorboard_folder_keep_each_others_points(tmp_path):
    # TensorBoard's purge covers every tag of the folder: only a resumed run may ask for one.
    pytest.importorskip("tensorboard")
    from types import SimpleNamespace

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kdseq_fast.callbacks import TensorBoardLogger
    from kdseq_fast.progress import RunProgress

    for label in ("teacher", "ce"):
        trainer = SimpleNamespace(label=label, progress=RunProgress(), resumed=False, log=print)
        tb = TensorBoardLogger(str(tmp_path))
        tb.on_train_start(trainer)
        for steps in (2, 4):
            tb.on_epoch_end(trainer, {"steps": steps, "test_acc": 0.5, "train_loss": 1.0})
        tb.on_train_end(trainer, {})
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [p.step for p in events.Scalars("teacher/test_acc")] == [2, 4]
    assert [p.step for p in events.Scalars("ce/test_acc")] == [2, 4]


def test_callbacks_hear_when_fit_stops_early_and_tensorboard_closes(tmp_path):
    # on_train_end never runs after a preemption, a non-finite stop or an error: the callbacks
    # get on_train_stopped instead, and TensorBoard's writer (its thread and file) is closed.
    pytest.importorskip("torch.utils.tensorboard")
    from kdseq_fast.callbacks import Callback, TensorBoardLogger

    class Failing(Callback):
        stopped = None

        def on_epoch_end(self, trainer, record):
            raise RuntimeError("a callback bug")

        def on_train_stopped(self, trainer, error):
            Failing.stopped = error

    cfg = load_config(None, ONE_EPOCH_SYNTHETIC, methods=("ce",))
    tb = TensorBoardLogger(str(tmp_path / "tb"))
    t = Trainer(cfg, str(tmp_path / "run"), method="ce", quiet=True, log=lambda m: None, callbacks=[tb, Failing()])
    with pytest.raises(RuntimeError, match="a callback bug"):
        t.fit()
    assert isinstance(Failing.stopped, RuntimeError) and tb.writer is None
