"""Dataset-level scoring: a student snapshot -> one row of difficulty measures per instance.

ISL-KD re-scores the whole training set at every phase boundary. The pass here runs the snapshot
over an un-augmented, ordered loader (eval mode, no grad, AMP on GPU), feeds the logits of
consecutive batches (chunks of about ``CHUNK_BYTES``: one call for a CIFAR-sized set) to the fused
``instance_scores`` kernel together with the cached teacher logits of the same rows, and scatters
the (rows, 6) result into an (N, 6) matrix indexed by dataset index.

- :func:`score_dataset`  - the (N, 6) score matrix (columns ``SCORE_FIELDS``)
- :func:`compute_logits` - (N, C) logits of any model (used for the teacher cache)
- :class:`TeacherLogitCache` - teacher logits computed once per run, optionally persisted as a
  ``.npy`` keyed by a hash of the teacher weights and the dataset, so a second run reuses them
- :func:`difficulty` - maps the score matrix to one difficulty per instance (``"ce"``,
  ``"ce+0.5*kd"``, ...)

Under ``torch.distributed`` each rank scores the share its (sharded) loader yields and the results
are summed across ranks, so every rank ends with the identical full matrix.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from typing import Callable, Iterable, Optional, Union

import numpy as np
import torch
from tqdm.auto import tqdm

from ._extension import check_cuda_kernels
from .amp import autocast as amp_autocast
from .amp import resolve_amp
from .arguments import check_int
from .config import MEASURE_TERMS, parse_measure
from .ops import SCORE_FIELDS, instance_scores
from .atomic_files import atomic_write, atomic_write_bytes, remove_stale_temps
from .runtime import staged_collective

__all__ = ["SCORE_FIELDS", "MEASURES", "score_dataset", "compute_logits", "TeacherLogitCache",
           "difficulty", "teacher_fingerprint"]

# Named difficulty measures: larger = harder.
MEASURES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "ce": lambda s: s[:, SCORE_FIELDS.index("ce")],
    "kd": lambda s: s[:, SCORE_FIELDS.index("kd")],
    "1-p_true": lambda s: 1.0 - s[:, SCORE_FIELDS.index("p_true")],
    "-margin": lambda s: -s[:, SCORE_FIELDS.index("margin")],
    "entropy": lambda s: s[:, SCORE_FIELDS.index("entropy")],
}
assert tuple(MEASURES) == MEASURE_TERMS, "scoring.MEASURES and config.MEASURE_TERMS must name the same terms"


# ---------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------
def _unpack(batch):
    """A loader batch as (images, labels, indices): dicts from CurriculumLoader or 3-tuples."""
    if isinstance(batch, dict):
        try:
            return batch["images"], batch["labels"], batch["indices"]
        except KeyError as exc:
            raise ValueError(f"loader batches must have keys images, labels, indices; missing {exc}") from None
    if isinstance(batch, (tuple, list)) and len(batch) == 3:
        return batch
    raise ValueError("loader must yield dicts {'images', 'labels', 'indices'} or (images, labels, indices) "
                     f"tuples, got {type(batch).__name__}")


def _infer_num_items(loader, num_items: Optional[int]) -> int:
    if num_items is not None:
        return check_int("num_items", num_items, 1)
    if hasattr(loader, "num_items"):
        return int(loader.num_items)
    dataset = getattr(loader, "dataset", None)
    if dataset is not None:
        return len(dataset)
    raise ValueError("num_items is required for a loader without .num_items or .dataset")


def _autocast(device: torch.device, amp):
    return amp_autocast(device, amp)


def _model_device(model: torch.nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _dist_active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _sum_across_ranks(*tensors: torch.Tensor) -> None:
    """In-place SUM all-reduce (each rank filled only its own rows; the rest are zero)."""
    if not _dist_active():
        return
    backend = torch.distributed.get_backend()
    for t in tensors:
        if backend == "nccl" and t.device.type != "cuda":
            # In pieces: a host table was kept there because it may not fit on the GPU whole.
            staged_collective(torch.distributed.all_reduce, t,
                              torch.device("cuda", torch.cuda.current_device()))
        elif backend != "nccl" and t.device.type == "cuda":
            moved = t.cpu()
            torch.distributed.all_reduce(moved)
            t.copy_(moved)
        else:
            torch.distributed.all_reduce(t)


def _fits_on(device: torch.device, nbytes: int) -> bool:
    """Whether a tensor of ``nbytes`` may live on ``device``: always on the CPU, within a quarter
    of the free memory on a GPU."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return nbytes <= free // 4


# Logits of consecutive batches are handed on in chunks of about this many bytes: one scoring
# kernel (and one index check) per chunk instead of per batch, so the pass pays the per-call host
# overhead of those small ops once per ~100k CIFAR rows rather than every 256.
CHUNK_BYTES = 64 << 20


class _Chunks:
    """Per-batch (logits, labels, indices) kept on the device until about ``CHUNK_BYTES`` of logits
    have gathered, then concatenated, index-checked and passed to ``on_chunk`` together."""

    def __init__(self, num_items, device, on_chunk):
        self.num_items, self.on_chunk = num_items, on_chunk
        self.parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.nbytes = 0
        self.seen = torch.zeros(num_items, dtype=torch.int32, device=device)
        self.outside = torch.zeros((), dtype=torch.int64, device=device)

    def add(self, logits, labels, indices) -> None:
        if indices.numel() == 0:
            return
        self.parts.append((logits, labels, indices))
        self.nbytes += logits.numel() * logits.element_size()
        if self.nbytes >= CHUNK_BYTES:
            self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        parts, self.parts, self.nbytes = self.parts, [], 0
        if len(parts) == 1:
            logits, labels, indices = parts[0]
        else:
            logits, labels, indices = (torch.cat(xs) for xs in zip(*parts))
        # Counted on the device and reported at the end; clamped meanwhile so nothing writes out of
        # bounds.
        self.outside += ((indices < 0) | (indices >= self.num_items)).sum()
        indices = indices.clamp(0, self.num_items - 1)
        self.seen.index_add_(0, indices, torch.ones_like(indices, dtype=torch.int32))
        self.on_chunk(logits, labels, indices)


def _traverse(model, loader, *, num_items, device, amp, progress, desc, on_chunk):
    """Runs the model over the loader (eval, no grad) and calls on_chunk(logits, labels, indices)
    with the rows of one or more consecutive batches (see ``CHUNK_BYTES``).

    Nothing is read back per batch (a GPU pass runs at the GPU's speed): indices outside
    [0, num_items) are counted on the device and reported at the end. Returns how often each index
    was seen (CPU)."""
    was_training = model.training
    model.eval()
    total = None
    with contextlib.suppress(TypeError):
        total = len(loader)
    chunks = _Chunks(num_items, device, on_chunk)
    try:
        with torch.no_grad(), _autocast(device, amp):
            bar = tqdm(loader, total=total, desc=desc, disable=not progress, leave=False, unit="batch")
            for batch in bar:
                images, labels, indices = _unpack(batch)
                images, labels, indices = (torch.as_tensor(x) for x in (images, labels, indices))
                _check_batch(images, labels, indices)
                indices = indices.to(device, torch.int64, non_blocking=True)
                images = images.to(device, non_blocking=True)
                labels = labels.to(device, non_blocking=True)
                chunks.add(model(images), labels, indices)
            chunks.flush()
    finally:
        model.train(was_training)
    if int(chunks.outside):
        raise ValueError(f"loader yielded {int(chunks.outside)} dataset indices outside [0, {num_items})")
    return chunks.seen.cpu()


def _check_batch(images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor) -> None:
    """Shapes and dtypes only (known on the host: no wait for the GPU)."""
    if indices.dim() != 1 or indices.dtype.is_floating_point or indices.dtype.is_complex or \
            indices.dtype == torch.bool:
        raise ValueError(f"loader batches' indices must be a 1-D integer tensor of dataset indices, got "
                         f"{indices.dtype} of shape {tuple(indices.shape)}")
    if images.dim() == 0 or images.shape[0] != indices.shape[0] or labels.shape[:1] != indices.shape:
        raise ValueError(f"a loader batch has {images.shape[0] if images.dim() else 0} images, "
                         f"{labels.shape[0] if labels.dim() else 0} labels and {indices.shape[0]} indices; "
                         "they must be as many")


def _check_coverage(seen: torch.Tensor, what: str) -> None:
    _sum_across_ranks(seen)
    missing = int((seen == 0).sum())
    repeated = int((seen > 1).sum())
    if missing or repeated:
        raise ValueError(
            f"{what}: the loader must yield every dataset index exactly once (un-augmented, ordered "
            f"pass); {missing} indices were never seen and {repeated} were seen more than once")


# ---------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------
def score_dataset(model: torch.nn.Module, loader: Iterable, teacher_logits=None, *,
                  num_items: Optional[int] = None, temperature: float = 4.0, device=None, amp=None,
                  progress: bool = True) -> torch.Tensor:
    """Scores every instance with ``model`` (a frozen snapshot): returns float32 (N, 6) on the CPU.

    The pass never waits for the GPU: scores and the coverage count stay on the device and come
    back in one copy at the end. Labels are not range-checked per batch (``instance_scores`` with
    ``validate=False``): a label outside [0, C) gives that instance NaN scores, which
    :func:`difficulty` reports.

    Args:
        model: the snapshot; put in eval mode for the pass, its mode restored afterwards. Its
            outputs are kept until their chunk is scored, so it must return a new tensor per call
            (a model replayed from a CUDA graph, e.g. ``torch.compile(mode="reduce-overhead")``,
            overwrites its output: wrap it to return ``out.clone()``).
        loader: yields ``{"images", "labels", "indices"}`` dicts (``CurriculumLoader`` with
            ``augment=None``) or ``(images, labels, indices)`` tuples; must cover every index once.
        teacher_logits: (N, C) tensor or array indexed by dataset index (see
            :class:`TeacherLogitCache`), or None (then the ``kd`` column is 0). A host table is
            copied to the GPU once when it fits in a quarter of the free memory.
        num_items: N; taken from ``loader.num_items`` or ``len(loader.dataset)`` when omitted.
        amp: ``"auto"``/None (bf16 on GPUs that support it, fp32 elsewhere), ``"none"``,
            ``"bf16"`` or ``"fp16"`` (see :mod:`kdseq_fast.amp`; torch dtypes are accepted too).
    """
    num_items = _infer_num_items(loader, num_items)
    device = _model_device(model, device)
    check_cuda_kernels(device)
    out = torch.zeros(num_items, len(SCORE_FIELDS), dtype=torch.float32, device=device)
    if teacher_logits is not None:
        teacher_logits = _as_logit_table(teacher_logits, num_items)
    if teacher_logits is not None and teacher_logits.device != device and \
            _fits_on(device, teacher_logits.numel() * teacher_logits.element_size()):
        teacher_logits = teacher_logits.to(device)

    def on_chunk(logits, labels, indices):
        t = None
        if teacher_logits is not None:
            t = teacher_logits.index_select(0, indices.to(teacher_logits.device)).to(logits.device, non_blocking=True)
            if t.shape[1] != logits.shape[1]:
                raise ValueError(f"teacher_logits has {t.shape[1]} classes but the model outputs {logits.shape[1]}")
        rows = instance_scores(logits.float() if logits.dtype == torch.float64 else logits, labels, t,
                               temperature=temperature, validate=False)
        out.index_copy_(0, indices, rows.float())

    seen = _traverse(model, loader, num_items=num_items, device=device, amp=amp, progress=progress,
                     desc="scoring", on_chunk=on_chunk)
    _check_coverage(seen, "score_dataset")
    _sum_across_ranks(out)
    return out.cpu()


def _as_logit_table(teacher_logits, num_items: int) -> torch.Tensor:
    """``score_dataset``'s teacher_logits as a floating (N, C) tensor: float64 (numpy's default)
    is taken as float32, the precision the scores are computed in."""
    if not isinstance(teacher_logits, torch.Tensor):
        array = np.asarray(teacher_logits)
        if array.dtype.kind not in "fiu":
            raise ValueError(f"teacher_logits must hold real numbers, got an array of {array.dtype}")
        teacher_logits = torch.from_numpy(array)
    if teacher_logits.device.type == "meta":
        raise ValueError("teacher_logits is a meta tensor (it holds no values)")
    if teacher_logits.dim() != 2 or teacher_logits.shape[0] != num_items:
        raise ValueError(f"teacher_logits must be (N, C) with N = {num_items} (the dataset's size), got shape "
                         f"{tuple(teacher_logits.shape)}")
    if teacher_logits.dtype.is_complex or teacher_logits.dtype == torch.bool:
        raise ValueError(f"teacher_logits must hold real numbers, got {teacher_logits.dtype}")
    if not teacher_logits.dtype.is_floating_point or teacher_logits.dtype == torch.float64:
        teacher_logits = teacher_logits.float()
    return teacher_logits


def compute_logits(model: torch.nn.Module, loader: Iterable, *, num_items: Optional[int] = None,
                   device=None, amp=None, progress: bool = True, dtype: torch.dtype = torch.float32,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(N, C) logits of ``model`` over an ordered, un-augmented pass, indexed by dataset index
    (returned on the CPU; gathered on the device when the matrix fits there, in one copy)."""
    num_items = _infer_num_items(loader, num_items)
    device = _model_device(model, device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.float32), got {dtype!r}")
    if out is not None and (not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != num_items
                            or out.dtype != dtype or out.device.type == "meta"):
        raise ValueError(f"out must be a ({num_items}, C) tensor of {dtype} (dtype), got "
                         + (f"{out.dtype} of shape {tuple(out.shape)} on {out.device}"
                            if isinstance(out, torch.Tensor) else type(out).__name__))
    holder = {"out": out}

    def on_chunk(logits, labels, indices):
        if out is not None and out.shape[1] != logits.shape[1]:
            raise ValueError(f"out has {out.shape[1]} columns but the model outputs {logits.shape[1]} classes")
        if holder["out"] is None:
            nbytes = num_items * logits.shape[1] * torch.tensor([], dtype=dtype).element_size()
            where = device if _fits_on(device, nbytes) else torch.device("cpu")
            holder["out"] = torch.zeros(num_items, logits.shape[1], dtype=dtype, device=where)
        dst = holder["out"]
        dst.index_copy_(0, indices.to(dst.device), logits.detach().to(dtype).to(dst.device))

    seen = _traverse(model, loader, num_items=num_items, device=device, amp=amp, progress=progress,
                     desc="logits", on_chunk=on_chunk)
    _check_coverage(seen, "compute_logits")
    if holder["out"] is None:
        raise ValueError("loader yielded no batches")
    _sum_across_ranks(holder["out"])
    return holder["out"].cpu()


def teacher_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the teacher's state dict (names, shapes, dtypes, bytes): the cache key's core."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            v = value.detach().cpu().contiguous()
            h.update(str((tuple(v.shape), str(v.dtype))).encode())
            h.update(v.reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def _any_inf(table: torch.Tensor, slice_values: int = 1 << 24) -> bool:
    """Whether a (rows, C) table holds an infinity, checked in slices of about ``slice_values``:
    a whole-table isinf held a bool and an abs() temporary, 1.5x the table, on the runs that
    chose a float16 cache to save memory."""
    rows = max(1, slice_values // max(1, table.shape[1]))
    return any(bool(torch.isinf(part).any()) for part in table.split(rows))


class TeacherLogitCache:
    """Teacher logits on the un-augmented training set, computed once per run and reused.

    With ``cache_dir`` the matrix is stored as ``teacher_logits_<key>.npy`` (+ ``.json`` metadata),
    keyed by a hash of the teacher weights, the dataset key (given by the caller; the trainer's
    holds the split's name, size and a digest of its contents), the storage dtype and the
    precision of the pass (bf16/fp16 autocast logits are not an fp32 run's); a later run with the
    same teacher, data and precision memory-maps it instead of recomputing. ``dtype="float16"`` halves the storage for large N x C. Without ``cache_dir`` the
    logits are kept in memory for the lifetime of this object.
    """

    def __init__(self, cache_dir: Optional[Union[str, os.PathLike]] = None, dtype: str = "float32"):
        if dtype not in ("float32", "float16"):
            raise ValueError(f"dtype must be 'float32' or 'float16', got {dtype!r}")
        self.cache_dir = None if cache_dir is None else os.path.expanduser(os.fspath(cache_dir))
        self.dtype = dtype
        self._memory: dict[str, torch.Tensor] = {}
        self.last_hit: Optional[bool] = None  # whether the last get() reused stored logits

    def key_for(self, teacher: torch.nn.Module, key: str, num_items: int, *, device=None, amp=None) -> str:
        """``device``/``amp`` as :meth:`get` takes them: the precision of the pass is in the key."""
        where = _model_device(teacher, device)
        precision = resolve_amp(amp, where)
        # How the logits are computed changes their last bits: the device's kernels and the
        # teacher's memory layout (channels-last convolutions in a non-deterministic run) too. A
        # deterministic run must not reuse logits another run computed otherwise.
        channels_last = any(p.dim() == 4 and not p.is_contiguous()
                            and p.is_contiguous(memory_format=torch.channels_last) for p in teacher.parameters())
        h = hashlib.sha256()
        h.update(teacher_fingerprint(teacher).encode())
        # Every precision in the key, fp32's too: files stored before it was (written by bf16
        # passes, as a GPU's amp auto does) must not be found by an fp32 run.
        h.update(f"|{key}|{num_items}|{self.dtype}|{precision}|{where.type}|cl{int(channels_last)}".encode())
        return h.hexdigest()[:24]

    def path_for(self, cache_key: str) -> Optional[str]:
        if self.cache_dir is None:
            return None
        return os.path.join(self.cache_dir, f"teacher_logits_{cache_key}.npy")

    def get(self, teacher: torch.nn.Module, loader: Iterable, *, num_items: Optional[int] = None,
            key: str = "", device=None, amp=None, progress: bool = True) -> torch.Tensor:
        """The teacher's logits for every item of ``loader``: from memory, the stored file, or one
        pass of the teacher. Under torch.distributed every rank must call it (a collective): the
        ranks agree whether all of them can reuse stored logits, else all of them recompute
        together (each its shard), so a file seen by only some ranks cannot deadlock the job."""
        num_items = _infer_num_items(loader, num_items)
        cache_key = self.key_for(teacher, key, num_items, device=device, amp=amp)
        path = self.path_for(cache_key)
        found = self._stored(cache_key, num_items)
        if _dist_active():
            hits = torch.tensor([int(found is not None)], dtype=torch.int64)
            _sum_across_ranks(hits)
            if int(hits) != torch.distributed.get_world_size():
                found = None
        if found is not None:
            self._memory[cache_key] = found
            self.last_hit = True
            return found
        torch_dtype = torch.float16 if self.dtype == "float16" else torch.float32
        logits = compute_logits(teacher, loader, num_items=num_items, device=device, amp=amp,
                                progress=progress, dtype=torch_dtype)
        if self.dtype == "float16" and _any_inf(logits):
            # Stored as inf, they would turn every kd score and KD target of those rows into NaN.
            raise ValueError("the teacher's logits exceed float16's range (|x| > 65504) and cannot be "
                             "cached as float16; set train.teacher_cache_dtype=float32")
        self.last_hit = False
        if path is not None and (not _dist_active() or torch.distributed.get_rank() == 0):
            self._write(path, logits.numpy(), {"key": key, "num_items": num_items, "dtype": self.dtype,
                                               "num_classes": int(logits.shape[1])})
        if _dist_active():
            torch.distributed.barrier()
        self._memory[cache_key] = logits
        return logits

    def load(self, teacher: torch.nn.Module, *, num_items: int, key: str = "", device=None,
             amp=None) -> Optional[torch.Tensor]:
        """The logits kept for this teacher, dataset key and precision (``amp`` on ``device``, as
        :meth:`get` takes them), in memory or a readable stored file of the right size and dtype,
        or None. Local: no collective, never computes."""
        return self._stored(self.key_for(teacher, key, num_items, device=device, amp=amp), num_items)

    def _stored(self, cache_key: str, num_items: int) -> Optional[torch.Tensor]:
        if cache_key in self._memory:
            return self._memory[cache_key]
        path = self.path_for(cache_key)
        if path is None or not os.path.exists(path):
            return None
        try:
            arr = np.load(path, mmap_mode="c")  # copy-on-write: writable view, file untouched
        except (ValueError, OSError, EOFError):
            return None  # unreadable (e.g. truncated or emptied by a crash): recompute and overwrite
        if arr.ndim != 2 or arr.shape[0] != num_items or str(arr.dtype) != self.dtype:
            return None
        return torch.from_numpy(arr)

    @staticmethod
    def _write(path: str, array: np.ndarray, meta: dict) -> None:
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, exist_ok=True)
        # A process killed while it wrote a table left its temporary file (N x C values): gone now.
        remove_stale_temps(directory, "teacher_logits_*")
        # The description first: a table is never there without it, and neither is ever torn.
        atomic_write_bytes(json.dumps(meta, indent=1).encode(), path[:-4] + ".json")
        atomic_write(path, lambda f: np.save(f, array))


def difficulty(scores: torch.Tensor, measure: str = "ce") -> torch.Tensor:
    """One float32 difficulty per instance (larger = harder) from an (N, 6) score matrix, on the
    CPU (scores on a GPU are copied over: N x 6 values, once per phase)."""
    if not isinstance(scores, torch.Tensor):
        scores = torch.as_tensor(np.asarray(scores))
    if scores.device.type == "meta":
        raise ValueError("scores is a meta tensor (it holds no values)")
    scores = scores.detach().cpu()
    if scores.dim() != 2 or scores.shape[1] != len(SCORE_FIELDS):
        raise ValueError(f"scores must have shape (N, {len(SCORE_FIELDS)}), got {tuple(scores.shape)}")
    total = torch.zeros(scores.shape[0], dtype=torch.float64)
    for coef, name in parse_measure(measure):
        total += coef * MEASURES[name](scores.double())
    # Checked as returned (float32): a large weight can overflow there although float64 held it.
    out = total.float()
    bad = ~torch.isfinite(out)
    if bad.any():
        first = int(bad.nonzero()[0])
        why = ("the measure's weights make it exceed float32's range" if math.isfinite(float(total[first]))
               else "check the snapshot and teacher logits")
        raise ValueError(f"difficulty {measure!r} is not finite for {int(bad.sum())} instances "
                         f"(first: index {first}); {why}")
    return out
