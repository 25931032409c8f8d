"""What a run is built from: the data splits, the loaders over them, the teacher and its cached
logits on the training set. Shared by the trainer, the CLI's ``score`` command and the benchmarks.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .config import Config
from .runtime import RunContext

__all__ = ["DataBundle", "build_data", "ordered_batch_size", "rank_loss_weight", "make_loader",
           "load_teacher", "probe_teacher_module", "shared_teacher_logits"]


@dataclass
class DataBundle:
    train: Any           # DatasetSplit
    test: Any            # DatasetSplit
    num_classes: int
    in_channels: int = 3  # image channels the models are built for (1 for Fashion-MNIST)
    name: str = ""       # data.name
    image_size: int = 0  # data.image_size

    # What the teacher saw, for the teacher-logit cache: not just the name and size (another folder
    # of as many images, or relabelled data, must not reuse a stored file) but a digest of the
    # contents. Computed when first asked (it reads every pixel, or stats every file; the split
    # keeps the digest).
    @property
    def key(self) -> str:
        return self._key(self.train)

    @property
    def test_key(self) -> str:
        return self._key(self.test)

    def _key(self, split) -> str:
        return f"{self.name}-{split.split}-n{len(split)}-s{self.image_size}-{split.content_digest()[:16]}"


def build_data(cfg: Config, progress: bool | None = None) -> DataBundle:
    """Training and test splits named by ``cfg.data`` (missing files -> FileNotFoundError
    naming the files and the download switch, raised by the datasets module); ``progress=False``
    silences the datasets' bars (``quiet``).

    Under torch.distributed with ``data.download`` every rank calls this, and the downloaders
    write the archive under its final name: ranks fetching into one folder at once would corrupt
    it. So the ranks take turns: global rank 0 first, then the first rank of every other node
    (its own folder, or nothing left to fetch on a shared one), then the rest, which find the
    files in place."""
    group = torch.distributed.is_available() and torch.distributed.is_initialized()
    if not (group and cfg.data.download and torch.distributed.get_world_size() > 1):
        return _build_data(cfg, progress)
    rank = torch.distributed.get_rank()
    first_of_node = int(os.environ.get("LOCAL_RANK", rank)) == 0
    bundle = None
    for turn in (rank == 0, rank != 0 and first_of_node):
        if turn:
            bundle = _build_data(cfg, progress)
        torch.distributed.barrier()
    return bundle if bundle is not None else _build_data(cfg, progress)


def _build_data(cfg: Config, progress: bool | None) -> DataBundle:
    from .datasets import dataset_from_config

    train = dataset_from_config(cfg, "train", progress)
    test = dataset_from_config(cfg, "test", progress)
    if train.num_classes != test.num_classes:
        raise ValueError(f"train/test class counts differ: {train.num_classes} vs {test.num_classes}")
    channels = 3 if train.is_files else int(train.images.shape[-1])
    return DataBundle(train, test, int(train.num_classes), channels, cfg.data.name, cfg.data.image_size)


def ordered_batch_size(num_items: int, batch_size: int, world: int) -> int:
    """Batch size for an ordered pass (scoring, teacher logits, evaluation) that covers every
    item on ``world`` ranks: the sharded loader drops a last global batch with fewer rows than
    ranks (so every rank steps together), which would lose items here, so shrink the batch until
    the remainder is zero or at least ``world``."""
    if batch_size < 1 or world < 1:
        raise ValueError(f"batch_size and world must be >= 1, got {batch_size} and {world}")
    if world <= 1:
        return batch_size
    if num_items < world:
        raise ValueError(f"a split of {num_items} items cannot be spread over {world} ranks "
                         "(every rank needs at least one row); use fewer processes")
    if num_items == world:
        return world

    def covers(b: int) -> bool:
        return not 0 < num_items % b < world

    # The largest batch up to the one asked for, else the smallest above it (num_items always works:
    # shrinking alone can end below the number of ranks, e.g. 13 items, batch 4, 2 ranks).
    b = max(int(batch_size), world)
    down = next((c for c in range(b, world - 1, -1) if covers(c)), None)
    return down if down is not None else next(c for c in range(b + 1, num_items + 1) if covers(c))


def rank_loss_weight(local_rows: int, global_rows: int, world: int) -> float:
    """Factor on a rank's mean loss so that DDP's *average* of the ranks' gradients equals the
    gradient of the mean loss over the whole global batch: ``local_rows * world / global_rows``
    (exactly 1.0 when the batch splits evenly)."""
    if global_rows < 1:
        raise ValueError(f"global_rows must be >= 1, got {global_rows}")
    if world <= 1 or local_rows * world == global_rows:
        return 1.0
    return local_rows * world / global_rows


def make_loader(cfg: Config, split, ctx: RunContext, *, augment: bool, seed: int,
                 shard=None, batch_size: int | None = None):
    from .data import CurriculumLoader

    files = isinstance(split.images, (list, tuple))
    aug = None
    if augment and cfg.data.augment != "none":
        # data.augment: cifar is the CIFAR protocol (pad 4, crop, flip) for the in-memory sets and
        # for CINIC-10, whose files are CIFAR-sized images; other file datasets (imagefolder) take
        # the random-resized crop of their image_size, as ImageNet-style training does. crop is
        # the CIFAR crop without the flip (SVHN: a mirrored digit is not a digit).
        aug = "crop" if cfg.data.augment == "crop" else "rrc" if files and split.name != "cinic10" else "cifar"
    return CurriculumLoader(
        split.images, split.labels, batch_size or cfg.optim.batch_size, backend=cfg.data.loader_backend,
        device=ctx.device.type, augment=aug, mean=split.mean, std=split.std, drop_last=False,
        num_threads=cfg.data.num_threads, seed=seed, shard=shard,
        image_size=cfg.data.image_size if files else None)


def load_teacher(cfg: Config, path: str, num_classes: int, device=None,
                 in_channels: int = 3) -> torch.nn.Module:
    """Build ``cfg.teacher.arch`` and load ``path`` into it (plain, RepDistiller ``{"model": sd}``,
    ours); a checkpoint for another architecture or class count raises ``ValueError`` naming the
    mismatched keys."""
    from .checkpoint_io import load_model_weights
    from .models import get_model

    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f"teacher checkpoint not found: {path!r} (train one with "
                                "`kdseq-fast train-teacher --out DIR` or pass --teacher PATH)")
    # The initial weights are overwritten: drawn from a forked generator, they leave the global one
    # (a student's dropout draws from it) as a teacher passed as a module would.
    with torch.random.fork_rng(devices=[]):
        model = get_model(cfg.teacher.arch, num_classes, image_size=cfg.data.image_size,
                          in_channels=in_channels)
    try:
        load_model_weights(model, path)
    except ValueError as exc:
        from .checkpoint_io import fit_hint

        hint = fit_hint(path, num_classes, "--set teacher.arch=", in_channels=in_channels,
                        image_size=cfg.data.image_size)
        raise ValueError(f"teacher checkpoint {path} does not fit teacher.arch="
                         f"{cfg.teacher.arch} with {num_classes} classes: {exc}{hint}") from None
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model.to(device) if device is not None else model


def check_teacher_argument(teacher) -> None:
    """None, a module or a non-empty checkpoint path ("" would name the working directory)."""
    if teacher is not None and not isinstance(teacher, torch.nn.Module) and \
            (not isinstance(teacher, (str, os.PathLike)) or not os.fspath(teacher)):
        raise ValueError(f"the teacher must be a torch.nn.Module or a checkpoint path, got {teacher!r}")


def probe_teacher_module(module: torch.nn.Module, num_classes: int, in_channels: int,
                         image_size: int) -> None:
    """One forward of a zero image shaped like the data, so that a teacher module built for other
    images (channels, size) or another class count fails before training, naming the shapes, and
    not at the first batch inside a convolution or the loss. (A checkpoint teacher is built for the
    data by ``load_teacher``.) The module must be in eval mode: the probe then leaves its state
    and the random streams as they were."""
    module = getattr(module, "_orig_mod", module)  # a torch.compile'd teacher: no compile for the probe
    first = next((t for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None else torch.float32
    x = torch.zeros(1, in_channels, image_size, image_size, device=device, dtype=dtype)
    shape = f"one {in_channels}x{image_size}x{image_size} image of this data"
    try:
        with torch.no_grad():
            out = module(x)
    except Exception as exc:  # noqa: BLE001 - re-raised with the data's shape named
        raise ValueError(f"the teacher module fails on {shape} (data.name, data.image_size): "
                         f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"the teacher module must return logits of shape (batch, {num_classes}) "
                         f"for this data's {num_classes} classes; on {shape} it returned {got}")


def open_teacher(cfg: Config, teacher, method: str, num_classes: int,
                 in_channels: int = 3) -> tuple[torch.nn.Module, str | None]:
    """The teacher of a kd/isl run and its checkpoint path (None for a module): ``teacher`` (a
    module or a checkpoint path), else ``teacher.checkpoint``; a clear error when there is none."""
    teacher = teacher if teacher is not None else cfg.teacher.checkpoint
    if teacher is None:
        raise ValueError(f"method {method!r} needs a teacher: pass --teacher PATH or set "
                         "teacher.checkpoint (train one with `kdseq-fast train-teacher`)")
    check_teacher_argument(teacher)
    if isinstance(teacher, torch.nn.Module):
        teacher.eval()
        probe_teacher_module(teacher, num_classes, in_channels, cfg.data.image_size)
        return teacher, None
    path = os.path.abspath(os.path.expanduser(os.fspath(teacher)))  # teacher.checkpoint may hold ~
    return load_teacher(cfg, path, num_classes, in_channels=in_channels), path


def shared_teacher_logits(ctx: RunContext, cache, teacher: torch.nn.Module, loader, *,
                          num_items: int, key: str, device, amp=None,
                          progress: bool = False) -> torch.Tensor:
    """``cache.get(...)`` that every rank agrees on under torch.distributed.

    Rank 0 alone decides whether a stored cache file is usable; on a hit it reads the file and
    broadcasts the matrix (the other ranks need not see rank 0's disk), on a miss every rank
    scores its shard and the pass sums them (``compute_logits``), then rank 0 stores the result.
    Letting each rank decide would deadlock when only some of them find the file.
    """
    if not ctx.distributed:
        return cache.get(teacher, loader, num_items=num_items, key=key, device=device, amp=amp,
                         progress=progress)
    from .scoring import TeacherLogitCache

    stored = None

    def usable() -> bool:  # runs on rank 0 only; the matrix it finds is what rank 0 broadcasts
        nonlocal stored
        stored = cache.load(teacher, num_items=num_items, key=key, device=device, amp=amp)
        return stored is not None

    if ctx.run_on_main(usable):
        if ctx.is_main:
            cache.last_hit = True
        # load(), not get(): get() is a collective, and only rank 0 read the file.
        return ctx.broadcast_tensor(stored)
    # Only rank 0 may write the file; the others keep their copy in memory.
    local = cache if ctx.is_main else TeacherLogitCache(None, dtype=cache.dtype)
    return local.get(teacher, loader, num_items=num_items, key=key, device=device, amp=amp,
                     progress=progress)
