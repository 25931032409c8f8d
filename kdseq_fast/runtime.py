"""Process-level plumbing for training runs: device, seeding, determinism, signals, checkpoints,
and the ``torch.distributed`` process group.

Everything multi-process lives behind :class:`RunContext` (device, rank, world size, "is main
process", metric reduction, broadcasts), so the trainer reads the same with one process or many.
:func:`setup_run` detects a ``torchrun`` environment (``RANK``/``WORLD_SIZE``/``LOCAL_RANK``),
initialises the process group once (``nccl`` on GPU, ``gloo`` on CPU; ``KDSEQ_DIST_BACKEND``
overrides, ``KDSEQ_DIST_TIMEOUT`` sets the collective timeout in seconds) and pins the GPU from
``LOCAL_RANK``; :func:`teardown_distributed` destroys the group at the end, and
:func:`exit_process` ends a process that had one without running the interpreter's teardown.

Checkpoint files have a small header in front of the ``torch.save`` payload::

    KDSEQCKPT1 <sha256 of payload>\\n<payload>

so a truncated or bit-flipped file is detected on load instead of unpickling garbage. Two
generations are kept (``checkpoint.pt`` and ``checkpoint.prev.pt``); each is written to a temp
file, fsynced and renamed, so a SIGKILL at any moment leaves at least one complete file.
"""
from __future__ import annotations

import datetime
import glob
import hashlib
import io
import os
import pickle
import random
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
import numpy as np
import torch

from .atomic_files import fsync_dir, temp_path, write_synced

__all__ = [
    "RunContext", "setup_run", "resolve_device", "seed_everything", "set_deterministic",
    "capture_rng_state", "restore_rng_state", "CheckpointError", "save_checkpoint",
    "load_checkpoint", "load_latest_checkpoint", "checkpoint_paths", "GracefulStop",
    "test_kill_hook", "SegmentTimer", "teardown_distributed",
    "dist_env", "test_dump_hook", "DEFAULT_DIST_TIMEOUT_S", "exit_process", "had_process_group",
    "staged_collective",
]

_MAGIC = b"KDSEQCKPT1"
CHECKPOINT_NAME = "checkpoint.pt"
# Long enough for the slowest gap between two collectives (rank 0 writing a large teacher-logit
# cache while the others wait at a barrier), short enough that a wedged job does not sit for hours.
DEFAULT_DIST_TIMEOUT_S = 1800.0
_DIST_BACKENDS = ("nccl", "gloo", "mpi", "ucc")
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


def dist_env(environ=None) -> tuple[int, int, int] | None:
    """``(rank, world_size, local_rank)`` when launched by torchrun with more than one process,
    else None. Reads the variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise ValueError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got RANK={env.get('RANK')!r} "
                         f"WORLD_SIZE={env.get('WORLD_SIZE')!r} LOCAL_RANK={env.get('LOCAL_RANK')!r}") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ValueError(f"inconsistent torchrun environment: RANK={rank} WORLD_SIZE={world} "
                         f"LOCAL_RANK={local}")
    return None if world == 1 else (rank, world, local)


def _dist_timeout(timeout_s) -> float:
    source = "timeout_s"
    if timeout_s is None:
        timeout_s, source = os.environ.get("KDSEQ_DIST_TIMEOUT") or DEFAULT_DIST_TIMEOUT_S, "KDSEQ_DIST_TIMEOUT"
    try:
        value = float(timeout_s)
    except (TypeError, ValueError):
        raise ValueError(f"{source} must be a number of seconds, got {timeout_s!r}") from None
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{source} must be a positive number of seconds, got {timeout_s!r}")
    return value


def _dist_backend(backend, device: torch.device) -> str:
    source = "backend"
    if backend is None:
        backend, source = os.environ.get("KDSEQ_DIST_BACKEND") or None, "KDSEQ_DIST_BACKEND"
    if backend is None:
        return "nccl" if device.type == "cuda" else "gloo"
    if not isinstance(backend, str) or backend.lower() not in _DIST_BACKENDS:
        raise ValueError(f"{source} must be one of {', '.join(_DIST_BACKENDS)}, got {backend!r}")
    backend = backend.lower()
    if backend == "nccl" and device.type != "cuda":
        raise ValueError(f"{source}=nccl needs CUDA devices but this run is on {device}; use gloo "
                         "(the default on CPU) or --device cuda")
    return backend


_OWNED_GROUP = False  # whether setup_run created the default process group (then we destroy it)


def teardown_distributed() -> None:
    """Destroy the process group that :func:`setup_run` created (no-op otherwise)."""
    global _OWNED_GROUP
    if _OWNED_GROUP and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _OWNED_GROUP = False


def had_process_group() -> bool:
    """Whether this process is a torchrun rank of several (:func:`setup_run` creates its group
    there) or created a process group itself: the processes :func:`exit_process` ends early."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return True
    return os.environ.get("WORLD_SIZE", "1").strip() not in ("", "1")


def exit_process(code: int) -> None:
    """End the process with ``code``; after a process group, without the interpreter's teardown.

    DistributedDataParallel keeps the process group alive in C++ after ``destroy_process_group``
    and a garbage collection, so the backend's communication threads (gloo's event loop and
    workers) are still running when the interpreter shuts down. Some exits then die of SIGABRT
    ("terminate called without an active exception"), which torchrun reports as a failed job
    after every file was written: 6 of 100 two-rank gloo jobs of a minimal DDP script did so, and
    0 of 100 that ended here (``benchmarks/exit_aborts.py``); a CI run of
    tests/test_distributed.py failed so. Such a process ends with ``os._exit`` after running the
    ``atexit`` callbacks and flushing the standard streams. A process that is not a torchrun rank
    of several (where :func:`setup_run` creates its group) and has no group of its own exits
    normally.
    """
    if not had_process_group():
        sys.exit(code)
    import atexit

    atexit._run_exitfuncs()  # logging's flush, TensorBoard writers: what a normal exit runs
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be said
            pass
    os._exit(code)


@dataclass
class RunContext:
    """Where this process runs and what it is responsible for.

    With one process this is rank 0 of 1 and every collective helper is the identity. Under
    torchrun :func:`setup_run` fills ``rank``/``world_size``; the trainer routes every file write
    through ``is_main``, every metric through :meth:`reduce_sum`, decisions that read the run
    directory through :meth:`run_on_main`, and shards its loaders by ``shard``.
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    deterministic: bool = False
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def shard(self):
        return None if self.world_size == 1 else (self.rank, self.world_size)

    def _comm_device(self) -> torch.device:
        # NCCL moves only CUDA tensors; gloo and the others work on host memory.
        return self.device if self.backend == "nccl" else torch.device("cpu")

    def reduce_sum(self, values: list[float]) -> list[float]:
        """Sum per-process metric values over all processes (identity with one process)."""
        if self.world_size == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device())
        torch.distributed.all_reduce(t)
        return t.tolist()

    def max_int(self, value: int) -> int:
        """The largest ``value`` over all processes (all ranks must call it)."""
        if self.world_size == 1:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.int64, device=self._comm_device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t.item())

    def any_true(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (all ranks must call it)."""
        return bool(self.max_int(1 if flag else 0))

    def _in_place(self, collective, t: torch.Tensor) -> None:
        """``collective(t)`` changing ``t`` in place, on a tensor this backend can move: NCCL
        moves GPU tensors itself; gloo/mpi/ucc get a GPU tensor through host memory."""
        if self.backend == "nccl" or t.device.type == "cpu":
            collective(t)
            return
        moved = t.cpu()
        collective(moved)
        t.copy_(moved)

    def all_reduce_max(self, t: torch.Tensor) -> None:
        """In-place MAX of ``t`` over all processes, without a host read on NCCL (the device
        step's non-finite flag: every rank skips the same steps)."""
        if self.world_size > 1:
            self._in_place(lambda x: torch.distributed.all_reduce(x, op=torch.distributed.ReduceOp.MAX), t)

    def broadcast_(self, tensors, src: int = 0) -> None:
        """In place: rank ``src``'s values of ``tensors`` on every rank (no-op with one process)."""
        if self.world_size > 1:
            for t in tensors:
                self._in_place(lambda x: torch.distributed.broadcast(x, src=src), t)

    def broadcast_object(self, obj, src: int = 0):
        """``obj`` from rank ``src`` on every rank (pickled; for small control data)."""
        if self.world_size == 1:
            return obj
        box = [obj if self.rank == src else None]
        torch.distributed.broadcast_object_list(box, src=src, device=self._comm_device())
        return box[0]

    def broadcast_tensor(self, tensor: torch.Tensor | None, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s CPU tensor on every rank (others pass None; shape/dtype travel too),
        through the GPU in pieces under NCCL (a teacher-logit table may not fit there whole)."""
        if self.world_size == 1:
            return tensor
        meta = self.broadcast_object(None if tensor is None else (tuple(tensor.shape), tensor.dtype), src)
        shape, dtype = meta
        buf = tensor.contiguous() if self.rank == src else torch.empty(shape, dtype=dtype)
        # The source's values do not change: writing them back would turn a memory-mapped table
        # (the teacher-logit cache) into private memory for nothing.
        staged_collective(lambda x: torch.distributed.broadcast(x, src=src), buf, self._comm_device(),
                          write_back=self.rank != src)
        return buf

    def run_on_main(self, fn):
        """Run ``fn()`` on rank 0 only and give every rank its result, or raise its exception on
        every rank. For decisions read from the run directory (is it a finished run, which
        checkpoint to resume): other ranks must not race rank 0's writes or see another file
        system (multi-node jobs without a shared disk)."""
        if self.world_size == 1:
            return fn()
        outcome = None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except Exception as exc:  # re-raised below on every rank, rank 0 included
                try:
                    pickle.dumps(exc)
                    outcome = ("err", exc)
                except Exception:
                    outcome = ("err", RuntimeError(f"{type(exc).__name__}: {exc}"))
        kind, value = self.broadcast_object(outcome)
        if kind == "err":
            raise value
        return value

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()


def late_cublas_config_warning() -> str | None:
    """Why a deterministic run set up now may fail at its first matrix multiply, or None.

    PyTorch decides once per process, at its first cuBLAS call, whether CUBLAS_WORKSPACE_CONFIG
    makes cuBLAS deterministic; setting the variable afterwards changes nothing, and with
    deterministic algorithms on every later matmul raises. A process that already used CUDA
    (a non-deterministic run, a notebook) may have made that call."""
    if "CUBLAS_WORKSPACE_CONFIG" in os.environ or not torch.cuda.is_available() \
            or not torch.cuda.is_initialized():
        return None
    return ("deterministic=true in a process that has already used CUDA without CUBLAS_WORKSPACE_CONFIG: "
            "PyTorch reads that variable at the process's first matrix multiply, so if one ran before, this "
            "run's first matmul raises. Set CUBLAS_WORKSPACE_CONFIG=:4096:8 in the environment before "
            "starting Python (or run deterministic jobs in a fresh process).")


# The most a host tensor puts on the GPU at once for a collective (see staged_collective).
STAGING_BYTES = 64 * 2**20


def staged_collective(collective, t: torch.Tensor, device: torch.device, write_back: bool = True) -> None:
    """``collective(x)`` changing the contiguous host tensor ``t`` in place, run on ``device``:
    directly when that is the CPU, else on copies of at most ``STAGING_BYTES`` at a time, so a
    large table (a teacher's logits on the whole training set) never needs its size free on the
    GPU. Every rank splits the same way (same shape and dtype), so the pieces pair up.
    ``write_back=False``: the collective leaves this rank's values as they are (a broadcast's
    source), so the GPU copies are not copied back."""
    if device.type == "cpu":
        collective(t)
        return
    if t.is_contiguous():
        flat = t.view(-1)
        step = max(1, STAGING_BYTES // t.element_size())
        pieces = [flat[start:start + step] for start in range(0, flat.numel(), step)]
    else:
        pieces = [t]  # not a table this was made for: one copy, as before
    for part in pieces:
        moved = part.to(device)
        collective(moved)
        if write_back:
            part.copy_(moved)


def setup_run(device: str = "auto", *, seed: int = 0, deterministic: bool = False,
              backend: str | None = None, timeout_s: float | None = None) -> RunContext:
    """Resolve the device, join the process group under torchrun, seed every generator and apply
    the determinism switches.

    Under torchrun (``WORLD_SIZE`` > 1) ``device="auto"``/``"cuda"`` becomes ``cuda:LOCAL_RANK``;
    ``backend`` (default ``KDSEQ_DIST_BACKEND``, else ``nccl`` on GPU and ``gloo`` on CPU) and
    ``timeout_s`` (default ``KDSEQ_DIST_TIMEOUT``, else 1800 s: a collective that waits longer
    raises instead of hanging) go to ``init_process_group``. A group that already exists (an
    earlier call, or one the caller created) is reused. Every rank gets the same seed: the
    student starts identical everywhere and epoch orders are pure functions of the seed.
    """
    global _OWNED_GROUP
    if deterministic:
        late = late_cublas_config_warning()
        if late:
            warnings.warn(late, stacklevel=2)
        # cuBLAS reads this when its handle is created; it must be set before the first matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    env = dist_env()
    initialized = torch.distributed.is_available() and torch.distributed.is_initialized()
    if env is not None and not initialized and str(device).startswith("cuda:") \
            and str(device) != f"cuda:{env[2]}" and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        # Every rank would take that one GPU (nccl then fails at its first collective with
        # "Duplicate GPU detected"); torchrun's ranks each take cuda:LOCAL_RANK. (cuda:LOCAL_RANK
        # itself, or cuda:0 where each rank sees one GPU, is what the rank would take anyway.)
        raise ValueError(f"device={device!r} under torchrun ({env[1]} processes): every rank would use that "
                         "one GPU; pass device 'cuda' (or 'auto') and each rank takes cuda:LOCAL_RANK (choose "
                         "the GPUs with CUDA_VISIBLE_DEVICES)")
    if env is not None and not initialized and (device in (None, "auto", "cuda")) \
            and torch.cuda.is_available():
        local = env[2]
        if local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} "
                             "CUDA device(s); lower --nproc_per_node")
        device = f"cuda:{local}"
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    rank, world, used_backend = 0, 1, None
    if initialized:
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        used_backend = str(torch.distributed.get_backend())
    elif env is not None:
        if not torch.distributed.is_available():
            raise RuntimeError("launched by torchrun but this PyTorch build has no torch.distributed")
        used_backend = _dist_backend(backend, dev)
        timeout = datetime.timedelta(seconds=_dist_timeout(timeout_s))
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        torch.distributed.init_process_group(used_backend, timeout=timeout, **kwargs)
        _OWNED_GROUP = True
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    set_deterministic(deterministic)
    seed_everything(seed)
    return RunContext(device=dev, rank=rank, world_size=world, deterministic=deterministic,
                      backend=used_backend)


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
    tmp = temp_path(latest)
    # A process killed mid-write left its partial file (one writer per directory: its lock).
    for stale in glob.glob(os.path.join(glob.escape(directory), f".{CHECKPOINT_NAME}.tmp.*")):
        if stale != tmp:
            try:
                os.unlink(stale)
            except OSError:
                pass

    def write(fh):
        fh.write(header)
        fh.write(payload)

    write_synced(tmp, write, latest)
    if os.path.exists(latest):
        os.replace(latest, prev)
    os.replace(tmp, latest)
    fsync_dir(directory)
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

    Nested uses share the outermost one: ``runs.distill``/``compare``/``train_teacher`` hold one
    for the whole command, so a signal while the data, the teacher or the next method of a
    comparison is being set up is a flag the next ``Trainer.fit`` honours at its start, not
    the default action (exit 143 without a word, or a KeyboardInterrupt traceback).
    """

    # Under torchrun the launcher forwards a signal it receives to every rank, so a job whose
    # processes are all signalled (a scheduler stopping it) gets each rank a second copy a few ms
    # after the first: not a request to stop at once without a checkpoint.
    REPEAT_GRACE_S = 5.0
    _active: "GracefulStop | None" = None  # the outermost installed instance

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.requested: int | None = None
        self._old: dict = {}
        self._since = 0.0
        self._outer: GracefulStop | None = None

    def _handle(self, signum, frame):
        if self.requested is not None:
            if "TORCHELASTIC_RUN_ID" in os.environ and signum == self.requested \
                    and time.monotonic() - self._since < self.REPEAT_GRACE_S:
                return  # the launcher's forwarded copy
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.request(signum)
        # Said at once: the stop waits for the current step or pass (a teacher-logit or scoring
        # pass can take minutes), and a second signal is the way to stop without a checkpoint.
        if os.environ.get("RANK", "0") == "0":
            # os.write, not print: the signal may have interrupted a write to stderr (a progress
            # bar), and a buffered stream re-entered from its handler raises.
            msg = (f"\n{signal.Signals(signum).name}: stopping after the current step or pass, with a "
                   "checkpoint; send it again to stop at once without one\n")
            try:
                os.write(2, msg.encode())
            except OSError:
                pass

    def request(self, signum: int) -> None:
        """Records a stop for ``signum``: the handler's, or another rank's signal agreed on."""
        self._since = time.monotonic()  # first: a copy landing between the two sees the grace
        self.requested = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.requested).name if self.requested else ""

    def __enter__(self) -> "GracefulStop":
        if GracefulStop._active is not None:
            self._outer = GracefulStop._active
            return self._outer  # its handlers stay; the caller reads and sets its flag
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handle)
            GracefulStop._active = self
        return self

    def __exit__(self, *exc):
        if self._outer is not None:
            self._outer = None
            return
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()
        if GracefulStop._active is self:
            GracefulStop._active = None
        return False


def _hook_applies() -> bool:
    # KDSEQ_TEST_HOOK_RANK restricts the hooks to one torchrun rank (a failure on one rank only).
    want = os.environ.get("KDSEQ_TEST_HOOK_RANK")
    return not (want and want.strip()) or int(want) == int(os.environ.get("RANK", "0"))


def _env_matches(name: str, value: int) -> bool:
    want = os.environ.get(name)
    return want is not None and bool(want.strip()) and int(want) == int(value) and _hook_applies()


def test_kill_hook(event: str, value: int) -> None:
    """Test-only crash injection: SIGKILL this process when ``KDSEQ_TEST_KILL_AT_<EVENT>`` matches.

    Events: ``STEP`` (after optimizer step N and any checkpoint it triggers), ``SCORING``
    (after phase K was scored, before its boundary checkpoint) and ``EPOCH_END`` (after epoch E's
    metrics and callbacks, before its checkpoint). ``KDSEQ_TEST_SIGTERM_AT_<EVENT>``
    sends SIGTERM instead, to test preemption at an exact point; ``KDSEQ_TEST_RAISE_AT_<EVENT>``
    raises a RuntimeError (an ordinary failure). ``KDSEQ_TEST_HOOK_RANK=r`` limits all three to
    torchrun rank r. Unset in normal use.
    """
    event = event.upper()
    if _env_matches(f"KDSEQ_TEST_KILL_AT_{event}", value):
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    # Preemption at an exact step: the handler sets the flag, the loop checkpoints and exits.
    if _env_matches(f"KDSEQ_TEST_SIGTERM_AT_{event}", value):
        os.kill(os.getpid(), signal.SIGTERM)
    if _env_matches(f"KDSEQ_TEST_RAISE_AT_{event}", value):
        raise RuntimeError(f"test failure injected by KDSEQ_TEST_RAISE_AT_{event}={value} on rank "
                           f"{os.environ.get('RANK', '0')}")


def test_dump_hook(name: str, **arrays) -> None:
    """Test-only: save ``arrays`` as ``$KDSEQ_TEST_DUMP_DIR/rank<R>_<name>.npz`` when that
    variable is set, so a test can compare what each rank actually used. Unset in normal use."""
    directory = os.environ.get("KDSEQ_TEST_DUMP_DIR")
    if not directory:
        return
    os.makedirs(directory, exist_ok=True)
    rank = torch.distributed.get_rank() if torch.distributed.is_available() and \
        torch.distributed.is_initialized() else 0
    np.savez(os.path.join(directory, f"rank{rank}_{name}.npz"), **arrays)


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
