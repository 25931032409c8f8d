"""Config loading, overrides, validation and hashing (kdseq_fast.config)."""
import glob
import os

import pytest
import yaml

from kdseq_fast.config import (DEFAULTS, Config, config_hash, load_config, parse_measure,
                               phase_epochs, save_config)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


def write(tmp_path, data, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return p


def test_defaults_load_and_access():
    cfg = load_config()
    assert cfg.to_dict() == DEFAULTS
    assert cfg.optim.lr == cfg["optim"]["lr"] == 0.05
    assert cfg.curriculum.pacing == "linear"
    assert phase_epochs(cfg) == (240 - 30 - 60) // 3 == 50
    assert isinstance(cfg.data, Config)


def test_file_then_overrides(tmp_path):
    p = write(tmp_path, {"optim": {"lr": 0.1}, "student": {"arch": "resnet20"}})
    cfg = load_config(p, ["optim.lr=0.2", "optim.lr_decay_epochs=[100, 200]",
                          "teacher.checkpoint=/tmp/t.pth", "train.target_acc=null"])
    assert cfg.optim.lr == 0.2                      # override beats the file
    assert cfg.student.arch == "resnet20"           # file beats the default
    assert cfg.optim.lr_decay_epochs == [100, 200]
    assert cfg.teacher.checkpoint == "/tmp/t.pth"
    assert cfg.train.target_acc is None
    assert cfg.optim.momentum == DEFAULTS["optim"]["momentum"]


def test_overrides_as_mapping_and_section_value():
    cfg = load_config(overrides={"optim.lr": 0.3, "loss": {"temperature": 2}})
    assert cfg.optim.lr == 0.3 and cfg.loss.temperature == 2.0
    assert isinstance(cfg.loss.temperature, float)


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "unknown config key 'optim.lrr'"),
    ("foo=1", "unknown config key 'foo'"),
    ("data.nme=cifar10", "unknown config key 'data.nme'"),
    ("optim.lr.x=1", "'optim.lr' is a value, not a section"),
])
def test_unknown_override_key(override, message):
    with pytest.raises(ValueError) as exc:
        load_config(overrides=[override])
    assert message in str(exc.value)


def test_unknown_key_lists_valid_keys(tmp_path):
    p = write(tmp_path, {"optim": {"learning_rate": 0.1}})
    with pytest.raises(ValueError) as exc:
        load_config(p)
    msg = str(exc.value)
    assert "optim.learning_rate" in msg
    for k in ("lr", "momentum", "weight_decay", "lr_decay_epochs"):
        assert k in msg
    assert str(p) in msg


def test_unknown_top_level_section_in_file(tmp_path):
    with pytest.raises(ValueError, match="'optimizer'"):
        load_config(write(tmp_path, {"optimizer": {"lr": 0.1}}))


def test_section_given_a_scalar(tmp_path):
    with pytest.raises(ValueError, match="optim"):
        load_config(write(tmp_path, {"optim": 3}))


@pytest.mark.parametrize("override, field", [
    ("optim.lr=abc", "optim.lr"),
    ("optim.lr=-0.1", "optim.lr"),
    ("optim.lr=.inf", "optim.lr"),
    ("optim.epochs=12.5", "optim.epochs"),
    ("optim.batch_size=0", "optim.batch_size"),
    ("method=foo", "method"),
    ("device=gpu", "device"),
    ("deterministic=yes-please", "deterministic"),
    ("curriculum.start_frac=0", "curriculum.start_frac"),
    ("curriculum.full_at=1.5", "curriculum.full_at"),
    ("curriculum.pacing=cosine", "curriculum.pacing"),
    ("curriculum.order=hard", "curriculum.order"),
    ("curriculum.measure=ce+loss", "curriculum.measure"),
    ("train.channels_last=maybe", "train.channels_last"),
    ("train.amp=fp8", "train.amp"),
    ("data.name=mnist", "data.name"),
    ("optim.lr_decay_epochs=[200, 100]", "optim.lr_decay_epochs"),
    ("optim.lr_decay_epochs=[300]", "optim.lr_decay_epochs"),
    ("teacher.epochs=0", "teacher.epochs"),
    ("optim.nesterov=1", "optim.nesterov"),
])
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(overrides=[override])


def test_valid_enum_and_special_values():
    cfg = load_config(overrides=["device=cuda:1", "train.channels_last=true", "train.amp=bf16",
                                 "teacher.epochs=5", "teacher.lr=0.1", "data.name=synthetic"])
    assert cfg.device == "cuda:1" and cfg.train.channels_last is True
    assert cfg.teacher.epochs == 5 and cfg.teacher.lr == 0.1


def test_float_given_in_exponent_form_without_dot():
    # PyYAML reads "5e-4" as a string; it must still be accepted as a number.
    cfg = load_config(overrides=["optim.weight_decay=5e-4"])
    assert cfg.optim.weight_decay == pytest.approx(5e-4)
    assert isinstance(cfg.optim.weight_decay, float)


def test_epoch_accounting():
    cfg = load_config(overrides=["optim.epochs=12", "curriculum.warmup_epochs=3",
                                 "curriculum.num_phases=2", "curriculum.final_full_epochs=3",
                                 "optim.lr_decay_epochs=[9]"])
    assert phase_epochs(cfg) == 3
    with pytest.raises(ValueError, match="curriculum.num_phases"):
        load_config(overrides=["optim.epochs=241"])
    with pytest.raises(ValueError, match="optim.epochs"):
        load_config(overrides=["optim.epochs=90", "optim.lr_decay_epochs=[]"])  # 90-30-60 = 0
    cfg0 = load_config(overrides=["curriculum.num_phases=0", "curriculum.warmup_epochs=180"])
    assert phase_epochs(cfg0) == 0
    # Only isl reads the curriculum: configs for ce/kd alone need not tile it.
    short = ["optim.epochs=2", "optim.lr_decay_epochs=[]"]
    assert load_config(overrides=short, methods=("ce", "kd")).optim.epochs == 2
    assert load_config(overrides=short + ["method=kd"]).optim.epochs == 2
    with pytest.raises(ValueError, match="epoch accounting"):
        load_config(overrides=short)  # the config's own method, isl by default
    with pytest.raises(ValueError, match="epoch accounting"):
        load_config(overrides=short + ["method=kd"], methods=("kd", "isl"))
    with pytest.raises(ValueError, match="epoch accounting"):
        load_config(overrides=short + ["method=kd"], methods="isl")  # one name, not its letters


def test_a_key_given_twice_in_a_file_is_an_error(tmp_path):
    # YAML keeps the last copy: the first optim block's lr would silently fall back to default.
    path = tmp_path / "twice.yaml"
    path.write_text("optim:\n  lr: 0.2\nseed: 1\noptim:\n  momentum: 0.8\n")
    with pytest.raises(ValueError, match="'optim' is given twice"):
        load_config(path)
    path.write_text("optim: {lr: 0.2, lr: 0.3}\n")
    with pytest.raises(ValueError, match="'lr' is given twice"):
        load_config(path)
    path.write_text("? [1, 2]\n: 3\n")
    with pytest.raises(ValueError, match="twice.yaml is not valid YAML"):  # a complex key: YAML's own error
        load_config(path)
    # Merge keys still work, and a key that overrides a merged one is not "given twice".
    path.write_text("optim: &b {lr: 0.2}\nteacher:\n  <<: *b\n  epochs: 3\n")
    cfg = load_config(path)
    assert (cfg.teacher.lr, cfg.teacher.epochs, cfg.optim.lr) == (0.2, 3, 0.2)
    path.write_text("optim: &b {lr: 0.2}\nteacher:\n  <<: *b\n  lr: 0.3\n")
    assert load_config(path).teacher.lr == 0.3


def test_measure_weights_must_be_finite_and_fit_float32_difficulties():
    import torch

    from kdseq_fast.scoring import difficulty

    with pytest.raises(ValueError, match="not a finite number"):
        load_config(overrides=["curriculum.measure=1e999*ce"])
    scores = torch.ones(4, 6)
    with pytest.raises(ValueError, match="float32's range"):
        difficulty(scores, "1e40*ce")
    assert torch.equal(difficulty(scores, "1e30*ce"), torch.full((4,), 1e30, dtype=torch.float32))


def test_override_syntax_errors():
    with pytest.raises(ValueError, match="key=value"):
        load_config(overrides=["optim.lr"])
    with pytest.raises(TypeError, match="single string"):
        load_config(overrides="optim.lr=0.1")


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ValueError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    assert load_config(write(tmp_path, "")).to_dict() == DEFAULTS


def test_parse_measure():
    assert parse_measure("ce") == [(1.0, "ce")]
    assert parse_measure("ce + 0.5*kd") == [(1.0, "ce"), (0.5, "kd")]
    assert parse_measure("2*-margin+1-p_true+entropy") == [(2.0, "-margin"), (1.0, "1-p_true"),
                                                          (1.0, "entropy")]
    assert parse_measure("1e+1*kd") == [(10.0, "kd")]
    assert parse_measure("ce+1E+0*kd+-0.1*entropy+1.*-margin") == [(1.0, "ce"), (1.0, "kd"), (-0.1, "entropy"),
                                                                   (1.0, "-margin")]
    for bad in ("", "margin", "ce+", "0.5*", "ce*2", "+ce", "--1*ce"):
        with pytest.raises(ValueError):
            parse_measure(bad)


def test_a_measure_the_config_accepts_is_one_the_curriculum_can_use():
    # One parser for both: a measure that validated once crashed the run after warm-up.
    import torch

    from kdseq_fast import scoring

    assert scoring.parse_measure is parse_measure
    for measure in ("1e+1*ce", "ce+1E+0*kd", "ce+-0.5*entropy"):
        cfg = load_config(None, [f"curriculum.measure={measure}"])
        assert scoring.difficulty(torch.ones(3, 6), cfg.curriculum.measure).shape == (3,)


def test_config_mutation_rules():
    cfg = load_config()
    cfg.teacher.checkpoint = "/x/teacher.pth"
    assert cfg["teacher"]["checkpoint"] == "/x/teacher.pth"
    with pytest.raises(ValueError, match="teacher.chekpoint"):
        cfg.teacher.chekpoint = "/x"
    with pytest.raises(ValueError, match="section"):
        cfg["optim"] = {}
    with pytest.raises(AttributeError, match="optim.lrr"):
        cfg.optim.lrr  # noqa: B018


def test_hash_is_stable_and_sensitive(tmp_path):
    a = load_config(overrides=["optim.lr=0.1"])
    # Same content written with a different key order hashes the same.
    d = a.to_dict()
    reordered = {k: d[k] for k in reversed(list(d))}
    b = load_config(write(tmp_path, reordered))
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 64
    c = load_config(overrides=["optim.lr=0.2"])
    assert config_hash(a) != config_hash(c)
    # Excluding a field makes the hash ignore it.
    e = load_config(overrides=["optim.lr=0.1", "device=cpu"])
    assert config_hash(a) != config_hash(e)
    assert config_hash(a, exclude=["device"]) == config_hash(e, exclude=["device"])


def test_save_and_reload_roundtrip(tmp_path):
    cfg = load_config(overrides=["optim.lr=0.07", "curriculum.measure=ce+0.5*kd",
                                 "train.target_acc=91.5"])
    path = tmp_path / "sub" / "config.yaml"
    save_config(cfg, path)
    again = load_config(path)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert yaml.safe_load(cfg.to_yaml()) == cfg.to_dict()
    assert not [p for p in os.listdir(path.parent) if p != "config.yaml"]  # no temp file left


def test_config_pickles_and_copies():
    import copy
    import pickle
    cfg = load_config(overrides=["optim.lr=0.3"])
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    c2 = copy.deepcopy(cfg)
    c2.optim.lr = 0.9
    assert cfg.optim.lr == 0.3


def test_repo_configs_are_valid():
    from kdseq_fast.models import list_models
    assert len(CONFIGS) >= 21, CONFIGS
    names = set(list_models())
    pairs = set()
    datasets = set()
    for path in CONFIGS:
        cfg = load_config(path)
        assert cfg.teacher.arch in names and cfg.student.arch in names, path
        pairs.add((cfg.teacher.arch, cfg.student.arch))
        datasets.add(cfg.data.name)
        phase_epochs(cfg)
    assert {("resnet32x4", "resnet8x4"), ("wrn_40_2", "wrn_16_2"), ("resnet56", "resnet20"),
            ("resnet110", "resnet20"), ("vgg13", "vgg8")} <= pairs
    assert {"cifar10", "cifar100", "svhn", "cinic10", "digits"} <= datasets


def test_standard_protocol_recipe():
    cfg = load_config(os.path.join(REPO, "configs", "cifar100_resnet32x4_resnet8x4.yaml"))
    assert (cfg.optim.epochs, cfg.optim.batch_size, cfg.optim.lr) == (240, 64, 0.05)
    assert cfg.optim.lr_decay_epochs == [150, 180, 210] and cfg.optim.weight_decay == 5e-4
    assert (cfg.loss.temperature, cfg.loss.ce_weight, cfg.loss.kd_weight) == (4.0, 0.1, 0.9)
    assert cfg.data.name == "cifar100" and cfg.data.augment == "cifar"


def test_svhn_recipes_crop_without_flips():
    # The protocol's pad-4 crop, not its flip (a mirrored digit is not a digit); they trained
    # without any augmentation before.
    import torch

    from kdseq_fast.run_inputs import make_loader
    from kdseq_fast.runtime import RunContext

    svhn = [p for p in CONFIGS if os.path.basename(p).startswith("svhn_")]
    assert len(svhn) == 5 and all(load_config(p).data.augment == "crop" for p in svhn)
    cfg = load_config(None, ["data.name=digits", "data.augment=crop", "data.loader_backend=torch"])
    from kdseq_fast.datasets import dataset_from_config

    split = dataset_from_config(cfg, "test")
    loader = make_loader(cfg, split, RunContext(torch.device("cpu")), augment=True, seed=0)
    assert loader.augment == "crop"


def test_digits_quick_recipe():
    cfg = load_config(os.path.join(REPO, "configs", "digits_quick.yaml"))
    assert cfg.data.name == "digits"
    assert cfg.optim.epochs <= 20 and phase_epochs(cfg) >= 1 and cfg.curriculum.num_phases >= 2


def test_nesterov_without_momentum_is_refused_at_load_time():
    # torch.optim.SGD refuses it only when the run builds its optimizer (after the data and,
    # for a student, the teacher pass).
    with pytest.raises(ValueError, match="optim.nesterov.*optim.momentum"):
        load_config(None, ["optim.nesterov=true", "optim.momentum=0"])
    assert load_config(None, ["optim.nesterov=true", "optim.momentum=0.9"]).optim.nesterov


def test_seed_and_measure_limits():
    with pytest.raises(ValueError, match="seed"):
        load_config(None, [f"seed={2**32}"])  # augmentation takes the seed modulo 2^32
    assert load_config(None, [f"seed={2**32 - 1}"]).seed == 2**32 - 1
    with pytest.raises(ValueError, match="weights every term by 0"):
        load_config(None, ["curriculum.measure=0*ce+0*kd"])


def test_read_metrics_keeps_records_after_an_unreadable_line(tmp_path):
    from kdseq_fast.reports import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1}\n{"epo\n{"epoch": 3}\n{"epoch": 4')
    assert [r["epoch"] for r in read_metrics(str(path))] == [1, 3]


def _run_lines(path):
    """The commands a recipe's '# Run:' comment gives, '<this file>' filled in."""
    import shlex

    text, grab = [], False
    with open(path) as fh:
        for line in fh:
            if not line.startswith("#"):
                break
            body = line[1:].strip()
            if body.startswith("Run:"):
                grab, body = True, body[len("Run:"):]
            if grab:
                text.append(body)
                if body.endswith(";"):
                    break
    joined = " ".join(text).rstrip(";").replace("<this file>", path)
    return [shlex.split(c)[1:] for c in joined.split(", then ") if c.strip()]


@pytest.mark.parametrize("path", [p for p in CONFIGS if "# Run:" in open(p).read()],
                         ids=os.path.basename)
def test_a_recipes_run_comment_is_commands_the_cli_accepts(path):
    # The comment is what a user copies: each command must parse, and distill needs the teacher
    # the first one trains (the recipes set teacher.checkpoint: null).
    from kdseq_fast.cli import build_parser

    commands = _run_lines(path)
    assert [c[0] for c in commands] == ["train-teacher", "distill"], commands
    parsed = [build_parser().parse_args(c) for c in commands]
    assert os.path.join(parsed[0].out, "teacher.pt") == parsed[1].teacher


def test_load_config_finds_a_packaged_recipe_from_anywhere(tmp_path, monkeypatch):
    # README's Python example, run outside the source tree: the recipe name or configs/NAME.yaml.
    monkeypatch.chdir(tmp_path)
    by_name = load_config("cifar100_resnet32x4_resnet8x4", ["data.name=digits"])
    by_path = load_config("configs/cifar100_resnet32x4_resnet8x4.yaml", ["data.name=digits"])
    assert by_name.to_dict() == by_path.to_dict() and by_name.student.arch == "resnet8x4"
    with pytest.raises(FileNotFoundError, match="not_a_recipe"):
        load_config("not_a_recipe")
