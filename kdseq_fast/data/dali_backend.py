"""NVIDIA DALI backend: the trainer's order is fed through a batch ``external_source`` callback.

Design notes (why, not what):
- The callback is in batch mode (``batch=True, batch_info=True``): batch ``i`` of the pass is the
  rank's span ``i`` of the order, gathered with one numpy fancy-index. Per-sample callbacks cost a
  Python call per image, and a per-sample source cannot emit the last partial batch of an order;
  the batch callback can (DALI accepts variable batch sizes from external_source).
- The parallel (multi-process) external source is not used: its workers hold a pickled copy of the
  callback, so the order the trainer sets each epoch would not reach them, and on in-memory data
  the gather is a memcpy that a worker process cannot beat.
- Random decisions are made on the host (``augment.py``) and passed to DALI as per-sample
  arguments (slice start, mirror, resize ROI), so DALI and torch backends draw identical crops and
  flips, and a resumed pass reproduces the uninterrupted one exactly.
- DALI prefetches as soon as an iterator is reset, so the pipeline is reset only when the next pass
  starts (after ``set_order``), never at the end of the previous one.
"""
from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np

from . import augment as aug


_IMPORT_ERROR: Optional[str] = None
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
except Exception as exc:  # ImportError, or a broken install failing on load
    _IMPORT_ERROR = f"nvidia-dali not importable ({type(exc).__name__}: {exc})"


def dali_import_error() -> Optional[str]:
    """None when DALI imports, else a one-line reason."""
    return _IMPORT_ERROR


class DaliBackend:
    name = "dali"

    def __init__(self, loader):
        if _IMPORT_ERROR is not None:
            raise RuntimeError(_IMPORT_ERROR)
        self.L = loader
        self.device = loader.device
        self.gpu = loader.device.type == "cuda"
        self._pass = None
        self._pipe = None
        self._iter = None
        self._needs_rebuild = False
        self._io_pool = None
        self._hw = self._views = None  # per-item file sizes and center views, read once (_sizes)
        self._build()

    # ---------------------------------------------------------------- host side
    def _callback(self, info):
        p = self._pass
        i = info.iteration
        if p is None or i >= len(p.spans):
            raise StopIteration
        s, e = p.spans[i]
        idx = p.order[s:e]
        outs = []
        paths = None
        if self.L._is_files:
            paths = [self.L._images[k] for k in idx]
            pool = self._io_pool
            encoded = list(pool.map(lambda f: np.fromfile(f, dtype=np.uint8), paths)) if pool \
                else [np.fromfile(f, dtype=np.uint8) for f in paths]
            outs.append(encoded)
        else:
            outs.append(self.L._images[idx])
        outs.append(self.L._labels[idx])
        outs.append(idx)
        # Image sizes from the file headers, for torchvision's geometry: the rrc boxes, or the
        # resize and center crop.
        sizes = (self._sizes(idx, outs[0], paths)
                 if paths is not None and self.L.image_size is not None else None)
        if sizes is not None and p.augment != "rrc":
            views = self._views[idx]
            outs += [views[:, :2].astype(np.float32), views[:, 2:].astype(np.int32)]
        if p.augment == "cifar":
            oy, ox, flip = (t[s:e].numpy() for t in p.crop_params)
            start = (np.stack([oy, ox], axis=1) - p.padding).astype(np.int32)
            outs += [start, flip.astype(np.int32)]
        elif p.augment == "rrc":
            boxes = np.array([aug.rrc_params(int(h), int(w), p.seed, p.epoch, pos)
                              for (h, w), pos in zip(sizes, range(s, e))], dtype=np.float32)
            outs += [boxes[:, :2].copy(), (boxes[:, :2] + boxes[:, 2:]).copy(),
                     p.flips[s:e].numpy().astype(np.int32)]
        return tuple(outs)

    def _sizes(self, idx: np.ndarray, encoded: list, paths: list) -> np.ndarray:
        """(height, width) of the items ``idx`` (rows), each header parsed once a run: a header
        parse and a view are tens of microseconds of serial Python a file, which capped a rank's
        loader at 15-40k img/s when repeated every epoch. ``self._views`` holds each item's
        resize-and-center-crop view (``augment.center_view``) alongside."""
        if self._hw is None:
            self._hw = np.zeros((len(self.L._images), 2), dtype=np.int64)  # 0: not read yet
            self._views = np.zeros((len(self.L._images), 4), dtype=np.int64)
        for j in np.flatnonzero(self._hw[idx, 0] == 0):
            if self._hw[idx[j], 0]:
                continue  # met twice in this batch
            h, w = aug.image_hw(io.BytesIO(encoded[j].tobytes()), paths[j])
            self._hw[idx[j]] = h, w
            self._views[idx[j]] = aug.center_view(h, w, self.L.image_size)
        return self._hw[idx]

    # ---------------------------------------------------------------- pipeline
    def _build(self):
        L = self.L
        files = L._is_files
        if files and self._io_pool is None:
            self._io_pool = ThreadPoolExecutor(max_workers=L.num_threads, thread_name_prefix="kdseq-io")
        size = L.image_size
        centered = files and L.augment != "rrc" and size is not None  # resize + center crop
        n_out = 3 + 2 * centered + {"cifar": 2, "crop": 2, "rrc": 3, None: 0}[L.augment]
        layouts = ["" if files else "HWC"] + [""] * (n_out - 1)
        mean = L.mean.tolist()
        std = L.std.tolist()
        gpu = self.gpu
        augment = "cifar" if L.augment == "crop" else L.augment  # its flips are all off

        @pipeline_def
        def graph():
            outs = fn.external_source(source=self._callback, num_outputs=n_out, batch=True,
                                      batch_info=True, layout=layouts)
            images, labels, indices = outs[:3]
            rest = list(outs[3:])
            mirror = 0
            if files:
                # adjust_orientation=False: pixels as stored, as PIL and torchvision (the torch
                # backend) read them. With EXIF rotation DALI's image would be the other's
                # transpose, and an rrc box computed from the stored size would fall outside it.
                images = fn.decoders.image(images, device="mixed" if gpu else "cpu",
                                           output_type=types.RGB, adjust_orientation=False)
                if augment == "rrc":
                    roi_start, roi_end, mirror = rest
                    images = fn.resize(images, roi_start=roi_start, roi_end=roi_end,
                                       roi_relative=False, size=[size, size], antialias=True)
                elif centered:
                    resized_hw, crop_start = rest[:2]
                    del rest[:2]
                    images = fn.resize(images, size=resized_hw, antialias=True)
                    images = fn.slice(images, start=crop_start, shape=[size, size], axis_names="HW")
            elif gpu:
                images = images.gpu()
            if augment == "cifar":
                start, mirror = rest
                images = self._pad_crop(images, start)
            images = fn.crop_mirror_normalize(images, mirror=mirror, mean=mean, std=std,
                                              dtype=types.FLOAT, output_layout="CHW")
            return images, labels, indices

        device_id = self.device.index if gpu else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._pipe = graph(batch_size=L.max_local_batch, num_threads=L.num_threads,
                               device_id=device_id, prefetch_queue_depth=2,
                               seed=L.seed & 0x7FFFFFFF)
            self._pipe.build()
        self._iter = None
        self._needs_rebuild = False

    def _pad_crop(self, images, start):
        """Window of the input's own size at ``start`` (may be negative): the pad-and-crop."""
        if self.L._is_files:
            side = self.L.image_size
            if side is None:
                raise ValueError("augment='cifar' on a file dataset needs image_size "
                                 "(the crop window size)")
            shape = [side, side]
        else:
            shape = list(self.L._images.shape[1:3])
        return fn.slice(images, start=start, shape=shape, axis_names="HW",
                        out_of_bounds_policy="pad", fill_values=0)

    # ---------------------------------------------------------------- iteration
    def iterate(self, p):
        if self._needs_rebuild:
            # The previous pass was abandoned with batches in flight; a DALI iterator cannot be
            # reset mid-epoch, so start from a fresh pipeline.
            self._teardown()
            self._build()
        self._pass = p
        if self._iter is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._iter = DALIGenericIterator(
                    self._pipe, ["images", "labels", "indices"],
                    last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False,
                    prepare_first_batch=False)
        else:
            self._iter.reset()
        self._needs_rebuild = True
        dev = self.device
        it = iter(self._iter)
        while True:
            try:
                out = next(it)
            except StopIteration:
                break
            except RuntimeError as exc:
                explained = _pipeline_error(exc)
                if explained is None:
                    raise
                raise explained from exc
            d = out[0]
            yield {"images": d["images"],
                   "labels": d["labels"].reshape(-1).to(dev, non_blocking=True),
                   "indices": d["indices"].reshape(-1).to(dev, non_blocking=True)}
        self._needs_rebuild = False

    def _teardown(self):
        self._iter = None
        self._pipe = None

    def close(self):
        self._teardown()
        self._pass = None
        if self._io_pool is not None:
            self._io_pool.shutdown(wait=False)
            self._io_pool = None


def _pipeline_error(exc: RuntimeError) -> ValueError | None:
    """A clear error for the DALI failures a user can fix, which DALI words as its internals: an
    image that does not decode (DALI names neither the file nor what to do; the torch backend
    names the file), and files of different sizes without ``image_size`` (a batch DALI cannot
    stack); None for other errors."""
    text = str(exc)
    if "IsDenseTensor" in text or "representable as a tensor" in text:
        return ValueError("images decode to different sizes; pass image_size to resize file datasets to a "
                          "common size")
    if "decod" not in text.lower() and "nvimagecodec" not in text.lower():
        return None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    first = next((line for line in lines if "decod" in line.lower() or "nvimagecodec" in line.lower()),
                 lines[0] if lines else text)
    return ValueError(f"the DALI loader could not decode an image ({first[:300].rstrip(',.:; ')}). A file in the "
                      "dataset is corrupt or not an image; --set data.loader_backend=torch names it")
