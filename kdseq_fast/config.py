"""Run configuration: defaults, YAML loading, ``--set key=value`` overrides and validation.

Every field has a default (``DEFAULTS``); a YAML recipe only states what differs. Unknown keys are
an error rather than silently ignored, because a typo such as ``optim.lr_decay_epoch`` would
otherwise run a 240-epoch job with the wrong schedule.

Usage::

    cfg = load_config("configs/cifar100_resnet32x4_resnet8x4.yaml", ["optim.lr=0.1"])
    cfg.optim.lr, cfg["optim"]["lr"]     # both work
    config_hash(cfg)                     # stable sha256, used to refuse resuming with another config
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
from collections.abc import Hashable, Mapping
from typing import Any, Callable, Iterable

import yaml

from .atomic_files import atomic_write_bytes

__all__ = [
    "DEFAULTS", "Config", "load_config", "find_config", "save_config", "config_hash", "apply_overrides",
    "validate_config", "phase_epochs", "parse_measure", "MEASURE_TERMS",
]

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "device": "auto",            # auto | cpu | cuda | cuda:N
    "deterministic": False,      # torch.use_deterministic_algorithms + cudnn flags
    "method": "isl",             # ce | kd | isl (what `distill` runs by default)
    "data": {
        "name": "digits",        # cifar10 | cifar100 | svhn | cinic10 | imagefolder | fashion_mnist | digits | synthetic
        "root": "./data",
        "download": False,
        "cinic_merge_valid": False,
        "loader_backend": "auto",  # auto | dali | torch
        "augment": "cifar",        # cifar | crop (no flip) | none
        "num_threads": 2,
        "synthetic_train": 2048,   # sizes/classes/image size used by name=synthetic
        "synthetic_test": 512,
        "synthetic_classes": 10,
        "image_size": 32,
        "train_subset": None,      # int: a fixed stratified subset of the training split (seed 0)
    },
    "teacher": {
        "arch": "resnet32x4",
        "checkpoint": None,      # path to a teacher checkpoint; None = must be trained (train-teacher)
        "epochs": None,          # teacher training epochs; None = optim.epochs
        "lr": None,              # teacher training LR; None = optim.lr
    },
    "student": {
        "arch": "resnet8x4",
    },
    "optim": {
        "epochs": 240,
        "batch_size": 64,        # global batch size (split across DDP ranks)
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 5.0e-4,
        "nesterov": False,
        "lr_decay_epochs": [150, 180, 210],
        "lr_decay_rate": 0.1,
    },
    "loss": {
        "temperature": 4.0,
        "ce_weight": 0.1,
        "kd_weight": 0.9,
    },
    "curriculum": {
        "warmup_epochs": 30,     # uniform-shuffle KD epochs before the first snapshot
        "num_phases": 3,         # phases after warm-up (each: snapshot -> score -> order -> paced epochs)
        "final_full_epochs": 60,  # last epochs on the full data (g == 1) with the final LR decay
        "measure": "ce",         # ce | kd | 1-p_true | -margin | entropy | weighted sums "ce+0.5*kd"
        "pacing": "linear",      # linear | root | step | exp | full
        "start_frac": 0.2,       # b: fraction of data admitted at the start of a phase, in (0, 1]
        "full_at": 0.8,          # a: fraction of the phase after which g == 1, in (0, 1]
        "strict_order": False,   # True: batches follow the sequence exactly
        "order": "easy",         # easy | anti (hard->easy) | random (ablations)
        "mix_frac": 0.2,         # easy-first mixing: share of each paced batch from the not-yet-admitted rest (measured best reading, README)
    },
    "train": {
        "amp": "auto",           # auto (bf16 on GPUs with bf16, fp32 elsewhere) | none | bf16 | fp16
        "compile": "auto",       # torch.compile student and teacher: auto (off until measured) | true | false
        "compile_mode": "default",  # default | reduce-overhead (CUDA graphs) | max-autotune-no-cudagraphs
        "channels_last": "auto",  # auto (on, except deterministic CPU runs) | true | false
        "cuda_graphs": "auto",   # training step replayed as one CUDA graph: auto (one CUDA process, not compiled, not deterministic) | true (also a compiled step, unless compile_mode=reduce-overhead) | false
        "fused_optimizer": "auto",  # fused SGD (skips a non-finite step on a device flag): auto | true | false
        "log_every_steps": "auto",  # host reads of the device's loss/accuracy/guard counters: auto | N
        "eval_batch_size": "auto",  # evaluation, scoring and teacher-logit passes: auto | N
        "eval_every_epochs": 1,
        "checkpoint_every_steps": 0,  # 0 = only at epoch ends and phase boundaries
        "target_acc": None,      # steps_to_target target; None = the kd baseline's final accuracy
        "tensorboard": True,
        "nonfinite": "stop",     # stop | skip
        "teacher_cache_dir": None,   # teacher-logit .npy cache; None = <out>/cache
        "teacher_cache_dtype": "float32",  # float32 | float16
    },
}

# Terms a curriculum difficulty measure may combine; each is "larger = harder".
MEASURE_TERMS = ("ce", "kd", "1-p_true", "-margin", "entropy")


# --------------------------------------------------------------------------------------------
# Config object
# --------------------------------------------------------------------------------------------
class Config(Mapping):
    """Nested configuration with attribute and item access.

    Assigning to an existing key is allowed (the trainer records e.g. the trained teacher's
    checkpoint path); assigning an unknown key raises ``ValueError`` so typos cannot slip in.
    Call :func:`validate_config` after mutating if the new values may be out of range.
    """

    __slots__ = ("_data", "_path")

    def __init__(self, data: Mapping, _path: str = ""):
        if not isinstance(data, Mapping):
            raise TypeError(f"Config expects a mapping, got {type(data).__name__}")
        object.__setattr__(self, "_path", _path)
        object.__setattr__(self, "_data", {
            k: Config(v, _join(_path, k)) if isinstance(v, Mapping) else copy.deepcopy(v)
            for k, v in data.items()})

    # Mapping protocol -------------------------------------------------------------------------
    def __getitem__(self, key: str) -> Any:
        try:
            return self._data[key]
        except KeyError:
            raise KeyError(_unknown_key_message(_join(self._path, key), self._data)) from None

    def __iter__(self):
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        try:
            return self._data[key]
        except KeyError:
            raise AttributeError(_unknown_key_message(_join(self._path, key), self._data)) from None

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in self._data:
            raise ValueError(_unknown_key_message(_join(self._path, key), self._data))
        if isinstance(self._data[key], Config):
            raise ValueError(f"config key '{_join(self._path, key)}' is a section; set its fields")
        self._data[key] = copy.deepcopy(value)

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Config):
            return self.to_dict() == other.to_dict()
        if isinstance(other, Mapping):
            return self.to_dict() == dict(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"Config({self.to_dict()!r})"

    def __deepcopy__(self, memo) -> "Config":
        return Config(self.to_dict(), self._path)

    def __reduce__(self):
        return (Config, (self.to_dict(), self._path))

    # Export -----------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {k: v.to_dict() if isinstance(v, Config) else copy.deepcopy(v)
                for k, v in self._data.items()}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    def get_path(self, dotted: str) -> Any:
        """``cfg.get_path("optim.lr")``; unknown keys raise ``ValueError``."""
        node: Any = self
        for i, part in enumerate(dotted.split(".")):
            if not isinstance(node, Config) or part not in node._data:
                where = ".".join(dotted.split(".")[:i])
                valid = node._data if isinstance(node, Config) else {}
                raise ValueError(_unknown_key_message(_join(where, part), valid))
            node = node._data[part]
        return node


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else str(key)


def _unknown_key_message(dotted: str, valid: Iterable[str]) -> str:
    section = dotted.rsplit(".", 1)[0] if "." in dotted else "<top level>"
    return (f"unknown config key '{dotted}'; valid keys in section {section}: "
            f"{', '.join(sorted(map(str, valid)))}")


# --------------------------------------------------------------------------------------------
# Merging and overrides
# --------------------------------------------------------------------------------------------
def _merge(base: dict, update: Mapping, path: str = "") -> None:
    """Recursively merge ``update`` into ``base`` in place; unknown keys raise ``ValueError``."""
    if not isinstance(update, Mapping):
        raise ValueError(f"config section '{path or '<top level>'}' must be a mapping, "
                         f"got {type(update).__name__}: {update!r}")
    for key, value in update.items():
        dotted = _join(path, key)
        if key not in base:
            raise ValueError(_unknown_key_message(dotted, base))
        if isinstance(base[key], dict):
            _merge(base[key], value, dotted)
        else:
            if isinstance(value, Mapping):
                raise ValueError(f"config key '{dotted}' is a value, not a section; "
                                 f"got mapping {dict(value)!r}")
            base[key] = copy.deepcopy(value)


def _parse_override(item: str) -> tuple[str, Any]:
    if not isinstance(item, str):
        raise TypeError(f"override must be a 'key=value' string, got {type(item).__name__}: {item!r}")
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form key=value (e.g. optim.lr=0.1)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ValueError(f"override {item!r}: cannot parse value {raw!r} as YAML: {exc}") from None
    return key, value


def apply_overrides(data: dict, overrides: Iterable[str] | Mapping[str, Any]) -> dict:
    """Apply ``"a.b=value"`` strings (or a ``{"a.b": value}`` mapping) to a plain nested dict."""
    if isinstance(overrides, (str, bytes)):
        raise TypeError("overrides must be a sequence of 'key=value' strings, not a single string "
                        f"(got {overrides!r}); wrap it in a list")
    pairs = list(overrides.items()) if isinstance(overrides, Mapping) else \
        [_parse_override(o) for o in overrides]
    for key, value in pairs:
        parts = key.split(".")
        node = data
        for i, part in enumerate(parts):
            dotted = ".".join(parts[:i + 1])
            if not isinstance(node, dict):
                raise ValueError(f"config key '{'.'.join(parts[:i])}' is a value, not a section "
                                 f"(override key {key!r})")
            if part not in node:
                raise ValueError(_unknown_key_message(dotted, node))
            if i == len(parts) - 1:
                if isinstance(node[part], dict):
                    _merge(node[part], value if value is not None else {}, dotted)
                else:
                    if isinstance(value, Mapping):
                        raise ValueError(f"config key '{dotted}' is a value, not a section; "
                                         f"got mapping {dict(value)!r}")
                    node[part] = value
            else:
                node = node[part]
    return data


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _coerce_float(key: str, v: Any) -> float:
    # PyYAML reads "5e-4" (no dot) as a string, a well-known trap; accept numeric strings.
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise ValueError(f"config field '{key}' must be a number, got {v!r}") from None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"config field '{key}' must be a number, got {type(v).__name__} {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise ValueError(f"config field '{key}' must be finite, got {v!r}")
    return v


def _choice(*choices: str) -> Callable[[str, Any], Any]:
    def check(key: str, v: Any) -> Any:
        if not isinstance(v, str) or v not in choices:
            raise ValueError(f"config field '{key}' must be one of {', '.join(choices)}; got {v!r}")
        return v
    return check


def _int(lo: int | None = None, hi: int | None = None, nullable: bool = False):
    def check(key: str, v: Any) -> Any:
        if v is None and nullable:
            return None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not _is_int(v):
            raise ValueError(f"config field '{key}' must be an integer"
                             f"{' or null' if nullable else ''}, got {type(v).__name__} {v!r}")
        if lo is not None and v < lo:
            raise ValueError(f"config field '{key}' must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise ValueError(f"config field '{key}' must be <= {hi}, got {v}")
        return v
    return check


def _float(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, nullable: bool = False):
    def check(key: str, v: Any) -> Any:
        if v is None and nullable:
            return None
        v = _coerce_float(key, v)
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise ValueError(f"config field '{key}' must be {'>' if lo_open else '>='} {lo}, got {v}")
        if hi is not None and (v > hi or (hi_open and v == hi)):
            raise ValueError(f"config field '{key}' must be {'<' if hi_open else '<='} {hi}, got {v}")
        return v
    return check


def _bool(key: str, v: Any) -> Any:
    if not isinstance(v, bool):
        raise ValueError(f"config field '{key}' must be true or false, got {v!r}")
    return v


def _str(nullable: bool = False, nonempty: bool = True):
    def check(key: str, v: Any) -> Any:
        if v is None and nullable:
            return None
        if not isinstance(v, str) or (nonempty and not v):
            raise ValueError(f"config field '{key}' must be a non-empty string"
                             f"{' or null' if nullable else ''}, got {v!r}")
        return v
    return check


def _device(key: str, v: Any) -> Any:
    if not isinstance(v, str) or not re.fullmatch(r"auto|cpu|cuda(:\d+)?", v):
        raise ValueError(f"config field '{key}' must be auto, cpu, cuda or cuda:N; got {v!r}")
    return v


def _auto_bool(key: str, v: Any) -> Any:
    if v == "auto" or isinstance(v, bool):
        return v
    raise ValueError(f"config field '{key}' must be auto, true or false; got {v!r}")


def _auto_or_int(lo: int):
    def check(key: str, v: Any) -> Any:
        if v == "auto":
            return v
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not _is_int(v) or v < lo:
            raise ValueError(f"config field '{key}' must be auto or an integer >= {lo}; got {v!r}")
        return v
    return check


def _decay_epochs(key: str, v: Any) -> Any:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"config field '{key}' must be a list of epochs, got {v!r}")
    out = []
    for e in v:
        if isinstance(e, float) and e.is_integer():
            e = int(e)
        if not _is_int(e) or e < 0:
            raise ValueError(f"config field '{key}' must hold non-negative integers, got {v!r}")
        out.append(e)
    if out != sorted(out):
        raise ValueError(f"config field '{key}' must be non-decreasing (a repeated epoch decays "
                         f"once per repeat), got {v!r}")
    return out


def _measure(key: str, v: Any) -> Any:
    if not isinstance(v, str):
        raise ValueError(f"config field '{key}' must be a measure string such as 'ce' or "
                         f"'ce+0.5*kd', got {v!r}")
    try:
        parse_measure(v)
    except ValueError as exc:
        raise ValueError(f"config field '{key}': {exc}") from None
    return v


# Validators for known fields. Fields added to DEFAULTS without an entry here are checked
# against the type of their default (see _infer_validator), so new fields stay safe.
_VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "seed": _int(0, 2**32 - 1),  # the augmentation streams take the seed modulo 2^32
    "device": _device,
    "deterministic": _bool,
    "method": _choice("ce", "kd", "isl"),
    "data.name": _choice("cifar10", "cifar100", "svhn", "cinic10", "imagefolder", "fashion_mnist",
                         "digits", "synthetic"),
    "data.root": _str(),
    "data.download": _bool,
    "data.cinic_merge_valid": _bool,
    "data.loader_backend": _choice("auto", "dali", "torch"),
    "data.augment": _choice("cifar", "crop", "none"),
    "data.num_threads": _int(1),
    "data.synthetic_train": _int(1),
    "data.synthetic_test": _int(1),
    "data.synthetic_classes": _int(2),
    "data.image_size": _int(8),
    "data.train_subset": _int(1, nullable=True),
    "teacher.arch": _str(),
    "teacher.checkpoint": _str(nullable=True),
    "teacher.epochs": _int(1, nullable=True),
    "teacher.lr": _float(0.0, lo_open=True, nullable=True),
    "student.arch": _str(),
    "optim.epochs": _int(1),
    "optim.batch_size": _int(1),
    "optim.lr": _float(0.0, lo_open=True),
    "optim.momentum": _float(0.0, 1.0, hi_open=True),
    "optim.weight_decay": _float(0.0),
    "optim.nesterov": _bool,
    "optim.lr_decay_epochs": _decay_epochs,
    "optim.lr_decay_rate": _float(0.0, 1.0, lo_open=True),
    "loss.temperature": _float(0.0, lo_open=True),
    "loss.ce_weight": _float(0.0),
    "loss.kd_weight": _float(0.0),
    "curriculum.warmup_epochs": _int(0),
    "curriculum.num_phases": _int(0),
    "curriculum.final_full_epochs": _int(0),
    "curriculum.measure": _measure,
    "curriculum.pacing": _choice("linear", "root", "step", "exp", "full"),
    "curriculum.start_frac": _float(0.0, 1.0, lo_open=True),
    "curriculum.full_at": _float(0.0, 1.0, lo_open=True),
    "curriculum.strict_order": _bool,
    "curriculum.order": _choice("easy", "anti", "random"),
    "curriculum.mix_frac": _float(0.0, 1.0, hi_open=True),
    "train.amp": _choice("auto", "none", "bf16", "fp16"),
    "train.compile": _auto_bool,
    "train.compile_mode": _choice("default", "reduce-overhead", "max-autotune-no-cudagraphs"),
    "train.fused_optimizer": _auto_bool,
    "train.cuda_graphs": _auto_bool,
    "train.log_every_steps": _auto_or_int(1),
    "train.eval_batch_size": _auto_or_int(1),
    "train.channels_last": _auto_bool,
    "train.eval_every_epochs": _int(1),
    "train.checkpoint_every_steps": _int(0),
    "train.target_acc": _float(0.0, 100.0, nullable=True),
    "train.tensorboard": _bool,
    "train.nonfinite": _choice("stop", "skip"),
    "train.teacher_cache_dir": _str(nullable=True),
    "train.teacher_cache_dtype": _choice("float32", "float16"),
}


def _infer_validator(default: Any) -> Callable[[str, Any], Any]:
    if isinstance(default, bool):
        return _bool
    if _is_int(default):
        return _int()
    if isinstance(default, float):
        return _float()
    if isinstance(default, str):
        return _str(nonempty=False)
    if isinstance(default, list):
        def check(key: str, v: Any) -> Any:
            if not isinstance(v, (list, tuple)):
                raise ValueError(f"config field '{key}' must be a list, got {v!r}")
            return list(v)
        return check
    # A None default carries no type information: accept any YAML value.
    return lambda key, v: v


def _walk(defaults: dict, data: dict, path: str = ""):
    for key, default in defaults.items():
        dotted = _join(path, key)
        if isinstance(default, dict):
            yield from _walk(default, data[key], dotted)
        else:
            yield dotted, default, data, key


def validate_config(data: Mapping, *, methods: Iterable[str] | None = None) -> dict:
    """Check types, ranges and cross-field rules; returns a normalized plain dict.

    ``methods``: the methods the config will train (default: its own ``method``). The curriculum's
    epoch accounting is checked only when ``isl`` is among them: ce and kd never read the
    curriculum, so a short baseline run needs no curriculum overrides. Raises ``ValueError``
    naming the offending field.
    """
    d = data.to_dict() if isinstance(data, Config) else copy.deepcopy(dict(data))
    # Unknown keys would have been caught while merging; re-check for dicts built by hand.
    full = copy.deepcopy(DEFAULTS)
    _merge(full, d)
    for dotted, default, parent, key in _walk(DEFAULTS, full):
        check = _VALIDATORS.get(dotted) or _infer_validator(default)
        parent[key] = check(dotted, parent[key])

    # Epoch accounting: warm-up + phases + final block must tile the budget exactly, so every
    # phase has the same whole number of epochs and the LR schedule lines up with the phases.
    if isinstance(methods, str):
        methods = (methods,)
    if "isl" in (tuple(methods) if methods is not None else (full["method"],)):
        phase_epochs(full)
    epochs = full["optim"]["epochs"]
    bad = [e for e in full["optim"]["lr_decay_epochs"] if e > epochs]
    if bad:
        raise ValueError(f"config field 'optim.lr_decay_epochs' has epochs {bad} beyond "
                         f"optim.epochs={epochs}")
    if full["loss"]["ce_weight"] == 0 and full["loss"]["kd_weight"] == 0:
        raise ValueError("config fields 'loss.ce_weight' and 'loss.kd_weight' are both 0; "
                         "the loss would be identically zero")
    if full["optim"]["nesterov"] and full["optim"]["momentum"] == 0:
        raise ValueError("config field 'optim.nesterov' is true but 'optim.momentum' is 0; Nesterov "
                         "momentum needs a momentum > 0")
    return full


def phase_epochs(cfg: Mapping) -> int:
    """Epochs per curriculum phase: (epochs - warmup - final) / num_phases, a positive integer.

    Returns 0 when ``num_phases == 0`` (then warmup + final must equal the budget).
    """
    epochs = cfg["optim"]["epochs"]
    cur = cfg["curriculum"]
    warm, phases, final = cur["warmup_epochs"], cur["num_phases"], cur["final_full_epochs"]
    rest = epochs - warm - final
    if phases == 0:
        if rest != 0:
            raise ValueError(
                f"config fields 'curriculum.warmup_epochs' ({warm}) + 'curriculum.final_full_epochs' "
                f"({final}) must equal 'optim.epochs' ({epochs}) when curriculum.num_phases is 0")
        return 0
    if rest <= 0 or rest % phases:
        raise ValueError(
            "config epoch accounting: 'optim.epochs' - 'curriculum.warmup_epochs' - "
            f"'curriculum.final_full_epochs' = {epochs} - {warm} - {final} = {rest} must be a "
            f"positive multiple of 'curriculum.num_phases' ({phases}); phase_epochs is derived "
            "from these, adjust one of them")
    return rest // phases


_NUM = r"-?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
_TERM_RE = re.compile(rf"^(?:(?P<coef>{_NUM})\*)?(?P<name>1-p_true|-margin|ce|kd|entropy)$")


def parse_measure(measure: str) -> list[tuple[float, str]]:
    """Parse ``"ce"``, ``"ce+0.5*kd"``, ``"2*-margin+entropy"``, ``"ce+-0.1*entropy"`` into
    ``[(coef, term), ...]``: the one parser of measures, for the config and for ``difficulty``.

    Terms are :data:`MEASURE_TERMS`, each oriented so that larger means harder; terms are joined
    by ``+`` and may carry a coefficient ``c*`` (a number, possibly negative or with an exponent).
    """
    if not isinstance(measure, str) or not measure.strip():
        raise ValueError(f"measure must be a non-empty string, got {measure!r}")
    # Split on '+' that is not part of an exponent such as 1e+3.
    parts = re.split(r"(?<![0-9][eE])\+", measure.replace(" ", ""))
    out = []
    for part in parts:
        m = _TERM_RE.match(part)
        if not m:
            raise ValueError(f"bad measure term {part!r} in {measure!r}; terms are "
                             f"{', '.join(MEASURE_TERMS)}, optionally weighted like '0.5*kd', "
                             "joined by '+'")
        coef = float(m.group("coef")) if m.group("coef") else 1.0
        if not math.isfinite(coef):
            raise ValueError(f"measure {measure!r}: weight {m.group('coef')} of {m.group('name')} is not a "
                             "finite number")
        out.append((coef, m.group("name")))
    if all(coef == 0 for coef, _ in out):
        raise ValueError(f"measure {measure!r} weights every term by 0: every instance would be "
                         "equally difficult")
    return out


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


def find_config(name: str) -> str:
    """A config path, or a recipe name (``digits_quick``) looked up in the installed package
    (``kdseq_fast/configs/``) and then in the source tree's ``configs/``."""
    if os.path.isfile(name):
        return name
    stem = name[:-5] if name.endswith(".yaml") else name
    if os.path.normpath(os.path.dirname(stem)) == "configs":
        # The README's form (configs/NAME.yaml) run outside the source tree: the packaged copy.
        stem = os.path.basename(stem)
    candidates = [os.path.join(_PKG_DIR, "configs", stem + ".yaml"),
                  os.path.join(os.path.dirname(_PKG_DIR), "configs", stem + ".yaml")]
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise FileNotFoundError(f"config {name!r} not found (looked for the file and in "
                            f"{', '.join(os.path.dirname(c) for c in candidates)})")


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping: YAML keeps the last copy, so a
    second ``optim:`` block would silently drop the first one's settings (the same kind of slip
    as an unknown key, which is an error too)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # "<<: *anchor": its keys may be overridden here, as YAML intends
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # a complex key: SafeLoader's own error names it and the file
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one mapping", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(path: str | os.PathLike | None = None,
                overrides: Iterable[str] | Mapping[str, Any] = (), *,
                methods: Iterable[str] | None = None) -> Config:
    """Defaults <- YAML file (optional: a path, or a packaged recipe's name such as
    ``"digits_quick"``, see :func:`find_config`) <- ``"a.b=value"`` overrides, then validation
    (``methods``: see :func:`validate_config`)."""
    data = copy.deepcopy(DEFAULTS)
    if path is not None:
        # A file, or a recipe name / configs/NAME.yaml found in the package (as --config does).
        path = find_config(os.fspath(path))
        with open(path, encoding="utf-8") as fh:
            try:
                loaded = yaml.load(fh, Loader=_UniqueKeyLoader)
            except yaml.YAMLError as exc:
                raise ValueError(f"config file {path} is not valid YAML: {exc}") from None
            except UnicodeDecodeError as exc:
                raise ValueError(f"config file {path} is not UTF-8 text: {exc}") from None
        if loaded is not None:
            if not isinstance(loaded, Mapping):
                raise ValueError(f"config file {path} must contain a mapping at the top level, "
                                 f"got {type(loaded).__name__}")
            try:
                _merge(data, loaded)
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
    apply_overrides(data, overrides)
    return Config(validate_config(data, methods=methods))


def save_config(cfg: Config | Mapping, path: str | os.PathLike) -> None:
    """Write the config as YAML (atomically, so a crash never leaves half a file)."""
    text = cfg.to_yaml() if isinstance(cfg, Config) else \
        yaml.safe_dump(dict(cfg), sort_keys=False, default_flow_style=False)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(text.encode("utf-8"), path)


def config_hash(cfg: Config | Mapping, exclude: Iterable[str] = ()) -> str:
    """Stable sha256 hex digest of the canonical (sorted-key JSON) form of the config.

    ``exclude`` lists dotted keys to leave out (e.g. ``("device",)`` to allow resuming a run on
    another device).
    """
    d = cfg.to_dict() if isinstance(cfg, Config) else copy.deepcopy(dict(cfg))
    for dotted in exclude:
        parts = dotted.split(".")
        node = d
        for part in parts[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    canon = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()
