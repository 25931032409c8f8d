"""CurriculumLoader: delivers a trainer-chosen sequence of dataset indices as augmented batches."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from ..arguments import check_bool, check_int, host_array
from . import augment as aug

logger = logging.getLogger("kdseq_fast.data")

__all__ = ["CurriculumLoader"]

_AUGMENTS = (None, "cifar", "crop", "rrc")
_BACKENDS = ("auto", "dali", "torch")


@dataclass
class EpochPass:
    """Everything a backend needs to produce one pass; built by the loader, read by backends.

    ``spans`` are this rank's ``[start, stop)`` ranges of positions in ``order``, one per batch,
    beginning at ``start_batch``. Augmentation parameters are indexed by position in ``order``
    (the global sequence, not the rank's share), so they do not depend on sharding or resume.
    """
    order: np.ndarray          # int64, global sequence for the epoch
    epoch: int
    seed: int
    spans: list                # list[(start, stop)] into order, this rank only
    augment: Optional[str]
    padding: int
    crop_params: Optional[tuple] = None   # (oy, ox, flip) int64 tensors for "cifar"
    flips: Optional[torch.Tensor] = None  # int64 tensor for "rrc"


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _as_int_vector(x, name: str) -> np.ndarray:
    arr = np.asarray(host_array(x, name))
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(arr.shape)}")
    if arr.size and (arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return np.array(arr, dtype=np.int64, copy=True)


def _per_channel(value, channels: int, name: str, default: float) -> torch.Tensor:
    if value is None:
        value = default
    try:
        t = torch.as_tensor(host_array(value, name), dtype=torch.float64).flatten()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a number or one number per channel ({channels}), "
                         f"got {value!r}") from None
    if t.numel() == 1:
        t = t.repeat(channels)
    if t.numel() != channels:
        raise ValueError(f"{name} must have 1 or {channels} values (one per channel), got {t.numel()}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} must be finite, got {t.tolist()}")
    return t.to(torch.float32)


class CurriculumLoader:
    """Loads batches in exactly the order the trainer sets, augmented and normalized.

    Args:
        images: uint8 NHWC array (numpy or torch, held in memory) or a list of image file paths.
        labels: 1-D integer labels, one per image.
        batch_size: global batch size (summed over ranks when ``shard`` is given).
        backend: ``"dali"``, ``"torch"`` or ``"auto"`` (DALI when it imports and starts, else torch
            with one logged warning saying why).
        device: where batches are delivered, ``"cpu"`` or ``"cuda"``/``"cuda:k"``.
        augment: ``None``; ``"cifar"`` (zero-pad ``padding`` + random crop back to size +
            horizontal flip); ``"crop"`` (the same crops, never flipped: digits, text);
            ``"rrc"`` (random-resized-crop to ``image_size`` + flip, file datasets).
        mean, std: per-channel constants in 0-255 pixel units; output = (pixel - mean) / std.
            Defaults 0 and 255 (pixels scaled to [0, 1]).
        drop_last: drop the last global batch of an order when it is partial.
        num_threads: DALI worker threads / torch-backend decode threads (default: usable CPUs, ≤ 8).
        seed: augmentation seed; draws are a pure function of (seed, epoch, position in the order;
            for ``cifar`` also the order's length).
        shard: ``(rank, world)``; see ``set_order`` for how global batches are split.
        image_size: output side for file datasets (shorter-side resize + center crop without
            augmentation, crop target for ``"rrc"``); ``None`` keeps decoded size (all equal).
        padding: padding of the ``"cifar"`` crop (4 as in the CIFAR protocol).
        prefetch: batches the torch backend prepares ahead on a background thread (0 = inline).
    """

    def __init__(self, images, labels, batch_size: int, *, backend: str = "auto",
                 device="cpu", augment: Optional[str] = "cifar", mean=None, std=None,
                 drop_last: bool = False, num_threads: Optional[int] = None, seed: int = 0,
                 shard: Optional[Sequence[int]] = None, image_size: Optional[int] = None,
                 padding: int = 4, prefetch: int = 2):
        self._is_files = isinstance(images, (list, tuple))
        if self._is_files:
            if len(images) == 0:
                raise ValueError("images is an empty list of file paths")
            # Every entry (the set of their types is cheap even for millions of paths): bytes or
            # ints deep in a long list must not reach os.fspath or a decoder unnamed.
            ok = (str, os.PathLike)
            if not all(issubclass(t, ok) for t in set(map(type, images))):
                bad = next(i for i, p in enumerate(images) if not isinstance(p, ok))
                raise ValueError(f"images: file-path lists must hold str/PathLike, got "
                                 f"{type(images[bad]).__name__} {images[bad]!r} at index {bad}")
            self._images = [os.fspath(p) for p in images]
            channels = 3
        else:
            images = host_array(images, "images")
            if not isinstance(images, np.ndarray):
                raise ValueError("images must be a uint8 NHWC array or a list of file paths, "
                                 f"got {type(images).__name__}")
            if images.dtype != np.uint8:
                raise ValueError(f"images must be uint8 (0-255 pixels), got dtype {images.dtype}")
            if images.ndim != 4:
                raise ValueError(f"images must be 4-D NHWC, got shape {tuple(images.shape)}")
            if images.shape[-1] not in (1, 3, 4):
                hint = " (looks like NCHW; pass NHWC)" if images.shape[1] in (1, 3, 4) else ""
                raise ValueError(f"images must be NHWC with 1, 3 or 4 channels last, got shape "
                                 f"{tuple(images.shape)}{hint}")
            if images.shape[0] == 0:
                raise ValueError("images is empty")
            if images.shape[1] < 1 or images.shape[2] < 1:
                raise ValueError(f"images must have height and width >= 1, got shape {tuple(images.shape)}")
            self._images = np.ascontiguousarray(images)
            channels = images.shape[-1]
        self._labels = _as_int_vector(labels, "labels")
        if len(self._labels) != len(self._images):
            raise ValueError(f"images and labels lengths differ: {len(self._images)} images, "
                             f"{len(self._labels)} labels")
        self.batch_size = check_int("batch_size", batch_size, 1)
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if augment not in _AUGMENTS:
            raise ValueError(f"augment must be one of {_AUGMENTS}, got {augment!r}")
        if augment == "rrc" and not self._is_files:
            raise ValueError("augment='rrc' needs a file dataset (images as a list of paths); "
                             "use augment='cifar' for in-memory arrays")
        if augment == "rrc" and image_size is None:
            raise ValueError("augment='rrc' needs image_size (the output side of the crop)")
        if augment in ("cifar", "crop") and self._is_files and image_size is None:
            raise ValueError(f"augment={augment!r} on a file dataset needs image_size (the crop size)")
        if image_size is not None and not self._is_files:
            raise ValueError("image_size applies to file datasets only; in-memory images keep their size")
        self.augment = augment
        self.image_size = None if image_size is None else check_int("image_size", image_size, 1)
        self.padding = check_int("padding", padding, 0)
        self.mean = _per_channel(mean, channels, "mean", 0.0)
        self.std = _per_channel(std, channels, "std", 255.0)
        if (self.std <= 0).any():
            raise ValueError(f"std must be positive, got {self.std.tolist()}")
        try:
            self.device = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"device must be 'cpu' or 'cuda'/'cuda:k', got {device!r} ({exc})") from None
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device={device!r} but CUDA is not available")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        if shard is None:
            shard = (0, 1)
        try:
            rank, world = shard
            rank, world = check_int("rank", rank), check_int("world", world)
        except (TypeError, ValueError):
            raise ValueError(f"shard must be (rank, world), two integers, got {shard!r}") from None
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"shard must satisfy 0 <= rank < world, got {shard!r}")
        if self.batch_size < world:
            raise ValueError(f"batch_size={self.batch_size} is the global batch and must be at least "
                             f"the shard's world size ({world}): every rank needs a row of every batch")
        self.rank, self.world = rank, world
        self.drop_last = check_bool("drop_last", drop_last)
        self.num_threads = (min(8, _usable_cpus()) if num_threads is None
                            else check_int("num_threads", num_threads, 1))
        self.prefetch = check_int("prefetch", prefetch, 0)
        self.seed = check_int("seed", seed)
        self._epoch = 0
        self._order = np.arange(len(self._images), dtype=np.int64)
        self._start_batch = 0
        self._spans = self._global_spans(self._order)
        self._active = False
        self._backend = self._make_backend(backend)

    # ------------------------------------------------------------------ public state
    @property
    def num_items(self) -> int:
        """N, the number of images the indices refer to."""
        return len(self._images)

    @property
    def backend(self) -> str:
        """The backend actually in use: ``"dali"`` or ``"torch"``."""
        return self._backend.name

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def batches_per_epoch(self) -> int:
        """Batches in a full pass over the current order (after drop_last / shard dropping)."""
        return len(self._spans)

    def __len__(self) -> int:
        """Batches the next pass yields: ``batches_per_epoch - start_batch``."""
        return len(self._spans) - self._start_batch

    def set_epoch(self, epoch: int) -> None:
        """Seed augmentation of the next pass with (seed, epoch)."""
        if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        self._epoch = int(epoch)

    def set_order(self, indices, start_batch: int = 0) -> None:
        """Set the index sequence of the next pass (kept for later passes until set again).

        ``indices``: 1-D integers in ``[0, N)``, any length ≥ 1, repeats allowed.
        ``start_batch``: resume the pass at this global batch; batches ``start_batch..`` get the
        same samples and augmentation draws as in an uninterrupted pass.

        Global batch k holds positions ``[k*batch_size, (k+1)*batch_size)`` of the order. With
        ``shard=(rank, world)`` each global batch is split into ``world`` contiguous parts, as
        ``numpy.array_split`` does: the first ``nb % world`` ranks get one row more, so the ranks
        together consume exactly the batch. A last partial batch with fewer rows than ranks is
        dropped on every rank (logged), so that all ranks run the same number of steps.
        """
        order = _as_int_vector(indices, "indices")
        if order.size == 0:
            raise ValueError("indices (the order) is empty")
        lo, hi = int(order.min()), int(order.max())
        if lo < 0 or hi >= self.num_items:
            bad = lo if lo < 0 else hi
            raise ValueError(f"indices out of range: {bad} not in [0, {self.num_items})")
        spans = self._global_spans(order)
        if isinstance(start_batch, bool) or not isinstance(start_batch, (int, np.integer)) \
                or not 0 <= start_batch <= len(spans):
            raise ValueError(f"start_batch must be an int in [0, {len(spans)}], got {start_batch!r}")
        self._order, self._spans, self._start_batch = order, spans, int(start_batch)

    def batches_in(self, indices) -> int:
        """How many global batches a pass over ``indices`` has on this loader (after the drop of a
        last batch smaller than the number of ranks): the range of ``set_order``'s ``start_batch``."""
        return len(self._global_spans(_as_int_vector(indices, "indices")))

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict]:
        if self._active:
            raise RuntimeError("CurriculumLoader supports one pass at a time; finish or drop the "
                               "previous iterator first")
        epoch_pass = self._make_pass()
        self._active = True
        try:
            for batch in self._backend.iterate(epoch_pass):
                yield batch
        finally:
            self._active = False
        # Only a completed pass advances the epoch; a pass abandoned mid-way can be replayed.
        self._epoch += 1
        self._start_batch = 0

    def close(self) -> None:
        """Release backend resources (DALI pipelines, threads)."""
        self._backend.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing useful to report
            pass

    def __repr__(self) -> str:
        kind = "files" if self._is_files else f"array{tuple(self._images.shape)}"
        return (f"CurriculumLoader({kind}, batch_size={self.batch_size}, backend={self.backend!r}, "
                f"device={str(self.device)!r}, augment={self.augment!r}, shard=({self.rank}, {self.world}))")

    # ------------------------------------------------------------------ internals
    def _global_spans(self, order: np.ndarray) -> list:
        n = len(order)
        b = self.batch_size
        starts = list(range(0, n, b))
        spans = [(s, min(s + b, n)) for s in starts]
        if self.drop_last and spans and spans[-1][1] - spans[-1][0] < b:
            spans.pop()
        if self.world > 1 and spans and spans[-1][1] - spans[-1][0] < self.world:
            s, e = spans.pop()
            logger.info("dropping the last batch of the order (%d rows < world size %d) so every "
                        "rank runs the same number of steps", e - s, self.world)
        if not spans:
            raise ValueError(f"indices of length {n} yield no batch with batch_size={b}, "
                             f"drop_last={self.drop_last}, world={self.world}")
        return spans

    def _rank_span(self, s: int, e: int) -> tuple:
        q, r = divmod(e - s, self.world)
        start = s + self.rank * q + min(self.rank, r)
        return start, start + q + (1 if self.rank < r else 0)

    @property
    def max_local_batch(self) -> int:
        return -(-self.batch_size // self.world)

    def _make_pass(self) -> EpochPass:
        spans = [self._rank_span(s, e) for s, e in self._spans[self._start_batch:]]
        # "crop" runs as "cifar" with every flip off; the flips are drawn all the same, so its
        # crops are those of "cifar" with the same seed.
        p = EpochPass(order=self._order, epoch=self._epoch, seed=self.seed, spans=spans,
                      augment="cifar" if self.augment == "crop" else self.augment, padding=self.padding)
        if self.augment in ("cifar", "crop"):
            oy, ox, flip = aug.cifar_params(self.seed, self._epoch, len(self._order), self.padding)
            p.crop_params = (oy, ox, flip if self.augment == "cifar" else torch.zeros_like(flip))
        elif self.augment == "rrc":
            p.flips = aug.flip_params(self.seed, self._epoch, len(self._order))
        return p

    def _make_backend(self, backend: str):
        from .torch_backend import TorchBackend
        if backend == "torch":
            return TorchBackend(self)
        try:
            from .dali_backend import DaliBackend, dali_import_error
        except Exception as exc:  # the module itself failing is a bug, but must not kill "auto"
            if backend == "dali":
                raise
            logger.warning("CurriculumLoader: using the torch backend (DALI backend unavailable: %s)", exc)
            return TorchBackend(self)
        reason = dali_import_error()
        if reason is None:
            try:
                return DaliBackend(self)
            except Exception as exc:
                reason = f"DALI failed to start: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
                if backend == "dali":
                    raise RuntimeError(f"backend='dali': {reason}") from exc
        elif backend == "dali":
            raise RuntimeError(f"backend='dali' requested but {reason}")
        logger.warning("CurriculumLoader: using the torch backend (%s)", reason)
        return TorchBackend(self)
