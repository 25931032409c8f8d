"""The run directory: what a run writes, how a directory is recognised as holding a run, and when
it may be reused.

Files (main process only): ``config.yaml`` and ``run.json`` (the run's identity: role, method and
a hash of the settings that change results), ``metrics.jsonl`` (one record per epoch),
``phase_K_order.npy`` / ``phase_K_scores.npy``, ``checkpoint.pt`` (+ ``checkpoint.prev.pt``; see
:mod:`kdseq_fast.runtime`), ``student.pt`` / ``teacher.pt`` / ``teacher_best.pt``, ``summary.json``
and the plots. Every write is atomic (temp file, fsync, rename).
"""
from __future__ import annotations

import copy
import errno
import io
import json
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch
import yaml

from .config import Config, config_hash, save_config, validate_config
from .atomic_files import atomic_write_bytes
from .runtime import CheckpointError, load_latest_checkpoint

__all__ = ["RunDirectory", "RunDirError", "RUN_FILES", "run_files_in", "read_identity", "acquire_dir_lock", "release_dir_lock", "RESUME_IGNORED_KEYS", "ignored_keys", "TrainResult", "config_diff", "same_run_config",
           "write_json", "is_complete", "completed_state", "completed_result", "check_resumable"]

# Keys that may change between a run and its resume without changing the result: where it runs,
# where data lives, logging, how often it checkpoints and reads the device. `train.nonfinite` is
# here so a run stopped by a bad batch can be resumed with `nonfinite=skip`.
RESUME_IGNORED_KEYS = ("device", "data.root", "data.download", "data.num_threads",
                       "data.loader_backend", "train.tensorboard", "train.checkpoint_every_steps",
                       "train.teacher_cache_dir", "train.nonfinite", "train.target_acc",
                       "train.log_every_steps", "teacher.checkpoint",
                       # The graphed step runs the eager step's kernels (a cuda test compares them).
                       "train.cuda_graphs")


# Sections a method never reads: they cannot change its result, so they are not part of its identity
# (a kd run is the same run whatever the curriculum settings beside it; an ablation that changes a
# curriculum default still reuses the kd and ce runs it compares against).
UNUSED_BY_METHOD = {"ce": ("curriculum",), "kd": ("curriculum",), "isl": ()}


def ignored_keys(method: str | None = None) -> tuple[str, ...]:
    """Dotted keys (or whole sections) left out of ``method``'s run identity."""
    return RESUME_IGNORED_KEYS + UNUSED_BY_METHOD.get(method, ())


def _is_ignored(dotted: str, keys) -> bool:
    return any(dotted == k or dotted.startswith(k + ".") for k in keys)


class RunDirError(ValueError):
    """The output directory holds a different run, or a run that would be overwritten."""


@dataclass
class TrainResult:
    out_dir: str
    summary: dict
    weights_path: str


def _json_default(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def write_json(obj, path: str) -> None:
    atomic_write_bytes(json.dumps(obj, indent=2, default=_json_default).encode() + b"\n", path)


def config_diff(a: dict, b: dict, prefix: str = "", *, method: str | None = None) -> list[str]:
    """``"key (old in the checkpoint, new now)"`` for every key that differs and changes
    ``method``'s result."""
    keys = []
    for k in sorted(set(a) | set(b)):
        dotted = f"{prefix}{k}"
        va, vb = a.get(k), b.get(k)
        if _is_ignored(dotted, ignored_keys(method)):
            continue
        if isinstance(va, dict) and isinstance(vb, dict):
            keys += config_diff(va, vb, dotted + ".", method=method)
        elif va != vb:
            keys.append(f"{dotted} ({va!r} in the checkpoint, {vb!r} now)")
    return keys


def resume_hash(cfg: Config, method: str | None = None) -> str:
    """Hash of the settings that change ``method``'s result (None: every method's settings)."""
    return config_hash(cfg, exclude=ignored_keys(method))


# Fields added after runs existed, with the value that reproduces what those runs did where that
# differs from today's default: `curriculum.mix_frac` came in at 0.0 (paced admission alone), and
# its default became 0.2 later. A run written before it existed is a mix_frac=0 run.
FIELDS_ADDED = {("curriculum", "mix_frac"): 0.0}


def _filled(stored: dict, method: str | None = None):
    """A stored config with the fields added since it was written at the values that reproduce
    what it ran (``FIELDS_ADDED``, else today's defaults), or None when it no longer validates for
    ``method`` (a renamed or removed field)."""
    try:
        stored = copy.deepcopy(dict(stored))
        for (section, key), value in FIELDS_ADDED.items():
            if isinstance(stored.get(section), dict) and key not in stored[section]:
                stored[section][key] = value
        return validate_config(stored, methods=None if method is None else (method,))
    except (ValueError, TypeError, KeyError):
        return None


def same_run_config(stored: dict, cfg: Config, method: str | None = None) -> bool:
    """Whether a run's stored config (config.yaml, a checkpoint's) is ``cfg`` for resuming a run
    of ``method``. Fields added to the package since it was written take their defaults, so a newer
    version resumes an older run that way; a renamed or removed field makes it another run."""
    filled = _filled(stored, method)
    return filled is not None and resume_hash(Config(filled), method) == resume_hash(cfg, method)


def same_run(recorded_hash: str | None, stored, cfg: Config, method: str | None) -> bool:
    """Whether a recorded run is ``cfg``'s run of ``method``: its identity hash matches, or else its
    stored config (``stored()``, read only then; None when unreadable) does with today's defaults."""
    if recorded_hash == resume_hash(cfg, method):
        return True
    config = stored()
    return config is not None and same_run_config(config, cfg, method)


def read_stored_config(run_dir: str) -> dict | None:
    """A run directory's ``config.yaml`` as written, or None when it is missing or unreadable."""
    try:
        with open(os.path.join(run_dir, "config.yaml")) as fh:
            return yaml.safe_load(fh) or {}
    except (OSError, ValueError, yaml.YAMLError):
        return None


# What a run writes at the top of its directory (init deletes them when a run starts over).
RUN_FILES = ("metrics.jsonl", "summary.json", "checkpoint.pt", "checkpoint.prev.pt", "student.pt", "teacher.pt",
             "teacher_best.pt", "accuracy_vs_steps.png", "pacing.png", "difficulty_hist.png")
RUN_FOLDERS = ("tb",)  # TensorBoard events: a run that starts over must not append to the old curves

# Directories this process holds the lock of: path -> [file descriptor, holders, whether this
# process created the .lock file] (re-entrant, so one process may open a run twice; another
# process is refused).
_LOCKS: dict = {}


def read_identity(folder: str) -> dict | None:
    """A directory's ``run.json`` (role, method, identity hash; role "compare" for a comparison):
    None when there is none, {} when it cannot be read."""
    path = os.path.join(folder, "run.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            ident = json.load(fh)
    except (OSError, ValueError):
        return {}
    return ident if isinstance(ident, dict) else {}


def run_files_in(path: str) -> list[str]:
    """The run outputs (RUN_FILES, phase_K_*.npy) present in ``path``."""
    try:
        names = os.listdir(path)
    except OSError:
        return []
    return [n for n in names if n in RUN_FILES or (n.startswith("phase_") and n.endswith(".npy"))]


def acquire_dir_lock(path: str) -> None:
    """Holds ``path``/.lock until :func:`release_dir_lock`: a second process writing into the same
    directory (a job launched twice, a --resume while the run still goes) is refused, naming the
    holder. The lock is released by the OS when the process ends, however it ends."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no locking
        return
    path = os.path.abspath(path)
    if path in _LOCKS:
        _LOCKS[path][1] += 1
        return
    os.makedirs(path, exist_ok=True)
    lock_file = os.path.join(path, ".lock")
    created = not os.path.exists(lock_file)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            # A file system without flock (some network mounts): run unlocked rather than never.
            os.close(fd)
            return
        try:
            holder = os.read(fd, 64).decode(errors="replace").strip()
        finally:
            os.close(fd)
        raise RunDirError(f"output directory {path} is in use by another process"
                          + (f" (pid {holder})" if holder else "")
                          + ": wait for it to finish, or stop it, before starting or resuming a run there")
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    _LOCKS[path] = [fd, 1, created]


def release_dir_lock(path: str, *, refused: bool = False) -> None:
    """Gives up one hold of ``path``'s lock. ``refused``: the directory was not used (it holds
    someone else's results), so a ``.lock`` file this process created goes too, instead of being
    left behind in a folder the run never wrote to."""
    path = os.path.abspath(path)
    entry = _LOCKS.get(path)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] == 0:
        del _LOCKS[path]
        if refused and entry[2]:
            # Unlinked while still held: a process that opened the old file meanwhile is refused
            # by the flock; one that comes later creates a fresh file. This one writes nothing.
            try:
                os.remove(os.path.join(path, ".lock"))
            except OSError:
                pass
        os.close(entry[0])  # closing the descriptor releases the flock


class RunDirectory:
    """One run's output directory (``path``); writes happen on the main process only."""

    def __init__(self, path: str, *, is_main: bool = True):
        self.path = os.path.abspath(path)
        self.is_main = is_main
        self._locked = False

    def file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def unlock(self, *, refused: bool = False) -> None:
        """Lets another process use the directory (the run is over, or ``refused``: check() took
        the lock and turned the directory down)."""
        if self._locked:
            self._locked = False
            release_dir_lock(self.path, refused=refused)

    def __del__(self):
        self.unlock()

    # ------------------------------------------------------------------ identity
    def check(self, cfg: Config, role: str, method: str, *, resume: bool, overwrite: bool) -> None:
        """Refuses a directory in use by another process, holding another run or results that are
        not a run's, or this run without ``resume``/``overwrite``; else holds its lock (unlock())."""
        acquire_dir_lock(self.path)
        self._locked = True
        try:
            self._check_identity(cfg, role, method, resume=resume, overwrite=overwrite)
        except BaseException:
            self.unlock(refused=True)
            raise

    def _check_identity(self, cfg: Config, role: str, method: str, *, resume: bool, overwrite: bool) -> None:
        if overwrite:
            return
        other = read_identity(self.path)
        if other is None:
            found = run_files_in(self.path)
            if found:
                # Results without a run's identity (an older layout, files copied in): starting here
                # would delete them.
                raise RunDirError(
                    f"output directory {self.path} holds results that are not a run's ({', '.join(sorted(found))}, "
                    "no run.json); choose another --out or pass --overwrite to delete them")
            return
        if other.get("role") == "compare":
            raise RunDirError(
                f"output directory {self.path} holds a comparison (compare/demo of "
                f"{', '.join(other.get('methods') or [])}), each run in a folder of its own "
                f"({self.path}/<method>); choose another --out or pass --overwrite")
        # config.yaml is read only when the identity hashes differ (same_run) or to name the difference.
        same = (other.get("role") == role and other.get("method") == method
                and same_run(other.get("resume_hash"), lambda: read_stored_config(self.path), cfg, method))
        if not same:
            if (other.get("role"), other.get("method")) != (role, method):
                # The method is part of the identity hash: name it, not two hashes.
                what = f", not role {role}, method {method}"
            else:
                stored = read_stored_config(self.path)
                diff = [] if stored is None else config_diff(_filled(stored, method) or stored, cfg.to_dict(),
                                                             method=method)
                what = ("; config differs: " + "; ".join(diff)) if diff else \
                    f" (config hash {str(other.get('resume_hash'))[:12]} vs {resume_hash(cfg, method)[:12]} now)"
            raise RunDirError(
                f"output directory {self.path} already holds a different run (role "
                f"{other.get('role')}, method {other.get('method')}){what}; "
                + ("resume with the original settings (see config.yaml there), " if resume else "")
                + "choose another --out or pass --overwrite")
        if not resume:
            raise RunDirError(f"output directory {self.path} already holds this run; pass "
                              "--resume to continue it or --overwrite to start over")

    def init(self, cfg: Config, identity: dict) -> None:
        """Starting fresh (new directory or --overwrite): nothing of an older run may survive to be
        mistaken for this one's output or resumed into it."""
        if not self.is_main:
            return
        os.makedirs(self.path, exist_ok=True)
        for name in run_files_in(self.path):
            os.remove(self.file(name))
        for name in RUN_FOLDERS:
            shutil.rmtree(self.file(name), ignore_errors=True)
        save_config(cfg, self.file("config.yaml"))
        write_json(identity, self.file("run.json"))

    # ------------------------------------------------------------------ outputs
    def append_metrics(self, record: dict) -> None:
        if not self.is_main:
            return
        with open(self.file("metrics.jsonl"), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=_json_default) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def truncate_metrics(self, lines: int) -> None:
        """Keeps the first ``lines`` records (those written before the checkpoint resumed from)."""
        path = self.file("metrics.jsonl")
        if not self.is_main or not os.path.exists(path):
            return
        with open(path, encoding="utf-8") as fh:
            kept = fh.readlines()[:lines]
        atomic_write_bytes("".join(kept).encode(), path)

    def save_npy(self, name: str, array: np.ndarray) -> None:
        if not self.is_main:
            return
        buf = io.BytesIO()
        np.save(buf, array)
        atomic_write_bytes(buf.getvalue(), self.file(name))

    def save_weights(self, name: str, state: dict) -> str:
        """A plain state dict (tensors copied to the CPU, no shared storage) as ``name``."""
        path = self.file(name)
        if self.is_main:
            plain = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
            buf = io.BytesIO()
            torch.save(plain, buf)
            atomic_write_bytes(buf.getvalue(), path)
        return path

    def write_json(self, name: str, obj) -> None:
        if self.is_main:
            write_json(obj, self.file(name))


def check_resumable(state: dict, path: str, *, cfg: Config, role: str, method: str, checkpoint_format: int,
                    teacher_fingerprint: str | None) -> None:
    """Raises CheckpointError, naming what differs, unless checkpoint ``state`` (read from
    ``path``) can resume this run: same format, role and method, config and teacher weights."""
    if state.get("format") != checkpoint_format:
        raise CheckpointError(
            f"{path} was written by another version of kdseq-fast (checkpoint format "
            f"{state.get('format')}, this version reads {checkpoint_format}); start a new --out")
    if state.get("role") != role or state.get("method") != method:
        raise CheckpointError(
            f"{path} is a checkpoint of role {state.get('role')}/method {state.get('method')}, "
            f"not {role}/{method}")
    if not same_run(state["resume_hash"], lambda: state["config"], cfg, method):
        diff = config_diff(state["config"], cfg.to_dict(), method=method)
        raise CheckpointError(
            f"cannot resume {path}: the config differs from the one the run was started with: "
            + ("; ".join(diff) or "(hash mismatch)") + ". Resume with the original config "
            "(see config.yaml in the run directory) or start a new --out")
    if state.get("teacher_fingerprint") != teacher_fingerprint:
        raise CheckpointError(
            f"cannot resume {path}: the teacher weights differ from the teacher the run was "
            "started with; pass the original --teacher or start a new --out")


def is_complete(out_dir: str, role: str, method: str, cfg: Config) -> bool:
    """A finished run with the same identity: resume has nothing left to do."""
    return completed_state(out_dir, role, method, cfg) is not None


def completed_state(out_dir: str, role: str, method: str, cfg: Config) -> dict | None:
    """The last checkpoint of a finished run with the same identity (what the run was trained
    from, e.g. its ``teacher_fingerprint``), or None when there is no such run."""
    ident = read_identity(out_dir)
    if not ident or not os.path.isfile(os.path.join(out_dir, "checkpoint.pt")):
        return None
    if not os.path.isfile(os.path.join(out_dir, "teacher.pt" if role == "teacher" else "student.pt")):
        return None  # not complete: a resume writes the results again from the last checkpoint
    if ident.get("role") != role or ident.get("method") != method:
        return None
    if not same_run(ident.get("resume_hash"), lambda: read_stored_config(out_dir), cfg, method):
        return None
    found = load_latest_checkpoint(out_dir, log=lambda m: None)
    if found is None:
        return None
    p = found[0]["progress"]
    total = cfg.optim.epochs if role == "student" else (cfg.teacher.epochs or cfg.optim.epochs)
    if p["epoch"] >= total and os.path.exists(os.path.join(out_dir, "summary.json")):
        return found[0]
    return None


def completed_result(out_dir: str, weights: str, log, label: str) -> TrainResult:
    with open(os.path.join(out_dir, "summary.json")) as fh:
        summary = json.load(fh)
    log(f"[{label}] already complete in {out_dir}; nothing to resume")
    return TrainResult(os.path.abspath(out_dir), summary, os.path.join(os.path.abspath(out_dir), weights))
