"""Process-level plumbing for training runs: device, seeding, determinism, signals, checkpoints.

Everything that a later multi-GPU version has to touch lives here, behind :class:`RunContext`
(device, rank, world size, "is main process", metric reduction), so the trainer stays the same
when torchrun/DDP is added: only :func:`setup_run` and the reduction helpers change.

Checkpoint files have a small header in front of the ``torch.save`` payload::

    KDSEQCKPT1 <sha256 of payload>\\n<payload>

so a truncated or bit-flipped file is detected on load instead of unpickling garbage. Two
generations are kept (``checkpoint.pt`` and ``checkpoint.prev.pt``); each is written to a temp
file, fsynced and renamed, so a SIGKILL at any moment leaves at least one complete file.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
import numpy as np
import torch

__all__ = [
    "RunContext", "setup_run", "resolve_device", "seed_everything", "set_deterministic",
    "capture_rng_state", "restore_rng_state", "CheckpointError", "save_checkpoint",
    "load_checkpoint", "load_latest_checkpoint", "checkpoint_paths", "GracefulStop",
    "test_kill_hook", "SegmentTimer", "atomic_write_bytes",
]

_MAGIC = b"KDSEQCKPT1"
CHECKPOINT_NAME = "checkpoint.pt"
PREV_CHECKPOINT_NAME = "checkpoint.prev.pt"


# --------------------------------------------------------------------------------------------
# Device and process group
# --------------------------------------------------------------------------------------------
def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> the current CUDA device when available, else CPU; validates ``cuda:N``."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if spec is None or spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    if not isinstance(spec, str):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda:0', got {spec!r}")
    try:
        dev = torch.device(spec)
    except RuntimeError as exc:
        raise ValueError(f"device {spec!r} is not a valid torch device: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available on this machine "
                             "(use --device cpu)")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s)")
        dev = torch.device("cuda", index)
    elif dev.type != "cpu":
        raise ValueError(f"device must be cpu, cuda or cuda:N; got {spec!r}")
    return dev


@dataclass
class RunContext:
    """Where this process runs and what it is responsible for.

    Single process today (rank 0 of 1). A DDP version fills ``rank``/``world_size`` from the
    environment in :func:`setup_run`; the trainer already routes every file write through
    ``is_main``, every metric through :meth:`reduce_sum`, and shards its loaders by ``shard``.
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    deterministic: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def shard(self):
        return None if self.world_size == 1 else (self.rank, self.world_size)

    def reduce_sum(self, values: list[float]) -> list[float]:
        """Sum per-process metric values over all processes (identity with one process)."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def setup_run(device: str = "auto", *, seed: int = 0, deterministic: bool = False) -> RunContext:
    """Resolve the device, seed every generator and apply the determinism switches."""
    if deterministic:
        # cuBLAS reads this when its handle is created; it must be set before the first matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    set_deterministic(deterministic)
    seed_everything(seed)
    return RunContext(device=dev, deterministic=deterministic)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def set_deterministic(enabled: bool) -> None:
    torch.use_deterministic_algorithms(bool(enabled))
    torch.backends.cudnn.deterministic = bool(enabled)
    # Autotuning picks kernels by timing, which differs run to run; keep it for speed otherwise.
    torch.backends.cudnn.benchmark = not enabled


def capture_rng_state() -> dict:
    """RNG states as checkpoint-safe values (tensors, ints, lists: loadable with weights_only)."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": {"bit_generator": np_state["bit_generator"],
                  "key": torch.from_numpy(np.asarray(np_state["state"]["key"]).astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def restore_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            warnings.warn(f"checkpoint holds RNG states for {len(cuda_states)} CUDA devices, this "
                          f"machine has {torch.cuda.device_count()}; CUDA RNG not restored")


def _to_lists(obj):
    if isinstance(obj, tuple):
        return [_to_lists(o) for o in obj]
    return obj


# --------------------------------------------------------------------------------------------
# Checkpoint files
# --------------------------------------------------------------------------------------------
class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or belongs to a different run."""


def checkpoint_paths(directory: str) -> tuple[str, str]:
    return (os.path.join(directory, CHECKPOINT_NAME), os.path.join(directory, PREV_CHECKPOINT_NAME))


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform/filesystem; the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(data: bytes, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp.{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)


def save_checkpoint(state: dict, directory: str) -> str:
    """Atomically write ``state`` as ``directory/checkpoint.pt``, keeping the previous one.

    Order of operations: new file fully written and fsynced to a temp name, then the current
    checkpoint is renamed to ``checkpoint.prev.pt``, then the temp file is renamed into place.
    A kill between the two renames leaves only ``checkpoint.prev.pt``, which load falls back to.
    """
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    header = _MAGIC + b" " + hashlib.sha256(payload).hexdigest().encode("ascii") + b"\n"
    latest, prev = checkpoint_paths(directory)
    directory = os.path.dirname(os.path.abspath(latest))
    tmp = os.path.join(directory, f".{CHECKPOINT_NAME}.tmp.{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(header)
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    if os.path.exists(latest):
        os.replace(latest, prev)
    os.replace(tmp, latest)
    _fsync_dir(directory)
    return latest


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """Load and verify one checkpoint file; raises :class:`CheckpointError` when unusable."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    newline = data.find(b"\n", 0, 128)
    if newline < 0 or not data.startswith(_MAGIC + b" "):
        raise CheckpointError(f"{path} is not a kdseq-fast checkpoint (bad header)")
    digest = data[len(_MAGIC) + 1:newline].decode("ascii", "replace")
    payload = memoryview(data)[newline + 1:]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{path} is truncated or corrupt (checksum mismatch)")
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as exc:  # a valid checksum with an unloadable payload: still unusable
        raise CheckpointError(f"{path}: cannot unpickle checkpoint payload: {exc}") from None


def load_latest_checkpoint(directory: str, map_location="cpu", log=print) -> tuple[dict, str] | None:
    """The newest usable checkpoint in ``directory`` (latest, else previous), or None if none.

    A corrupt latest checkpoint with a good previous one logs a warning and returns the previous;
    if files exist but none is usable, raises :class:`CheckpointError` listing why.
    """
    errors = []
    for path in checkpoint_paths(directory):
        if not os.path.exists(path):
            continue
        try:
            state = load_checkpoint(path, map_location)
        except CheckpointError as exc:
            errors.append(str(exc))
            continue
        if errors:
            log(f"warning: {errors[0]}; falling back to the previous checkpoint {path}")
        return state, path
    if errors:
        raise CheckpointError("no usable checkpoint in " + directory + ": " + "; ".join(errors))
    return None


# --------------------------------------------------------------------------------------------
# Signals and test hooks
# --------------------------------------------------------------------------------------------
class GracefulStop:
    """Turns SIGTERM/SIGINT into a flag the training loop checks after each step.

    A preempted job then finishes its step, checkpoints and exits 0 instead of dying mid-write.
    A second signal while stopping restores the default handler behaviour (immediate exit).
    Only installs handlers in the main thread (signal.signal requires it).
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.requested: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.requested is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.requested).name if self.requested else ""

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
        return False


def test_kill_hook(event: str, value: int) -> None:
    """Test-only crash injection: SIGKILL this process when ``KDSEQ_TEST_KILL_AT_<EVENT>`` matches.

    Events: ``STEP`` (after optimizer step N and any checkpoint it triggers) and ``SCORING``
    (after phase K was scored, before its boundary checkpoint). ``KDSEQ_TEST_SIGTERM_AT_<EVENT>``
    sends SIGTERM instead, to test preemption at an exact point. Unset in normal use.
    """
    want = os.environ.get(f"KDSEQ_TEST_KILL_AT_{event.upper()}")
    if want is not None and want.strip() and int(want) == int(value):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    # Preemption at an exact step: the handler sets the flag, the loop checkpoints and exits.
    want = os.environ.get(f"KDSEQ_TEST_SIGTERM_AT_{event.upper()}")
    if want is not None and want.strip() and int(want) == int(value):
        os.kill(os.getpid(), signal.SIGTERM)


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
@dataclass
class SegmentTimer:
    """Accumulates wall time per named segment (data, model, loss, scoring, eval).

    On CUDA, host timestamps around asynchronous kernels measure launch time, not execution, so
    ``sync=True`` synchronizes at segment ends — used by the benchmark; the trainer keeps it off
    on GPU so timing never slows training.
    """

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sync: bool = True
    totals: dict = field(default_factory=dict)

    def __post_init__(self):
        self.sync = self.sync and self.device.type == "cuda"

    def now(self) -> float:
        if self.sync:
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def add(self, name: str, seconds: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + seconds

    def reset(self) -> dict:
        out, self.totals = self.totals, {}
        return out


def atomic_write_bytes(data: bytes, path: str) -> None:
    """Small atomic file writes (metrics, summaries, npy arrays) share the checkpoint protocol."""
    _write_atomic(data, path)

