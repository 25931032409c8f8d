"""Pure-PyTorch backend: same order, normalization and augmentation parameters as DALI."""
from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from . import augment as aug


def _decode_file(path: str, box, image_size):
    """PIL decode + torchvision v2 geometry; returns uint8 HWC numpy."""
    from PIL import Image
    import torchvision.transforms.v2.functional as TF

    with aug.decode_errors(path), Image.open(path) as im:
        img = im.convert("RGB")
    if box is not None:
        top, left, h, w = box
        img = TF.resized_crop(img, top, left, h, w, [image_size, image_size], antialias=True)
    elif image_size is not None:
        img = TF.center_crop(TF.resize(img, image_size, antialias=True), [image_size, image_size])
    return np.asarray(img, dtype=np.uint8)


class TorchBackend:
    name = "torch"

    def __init__(self, loader):
        self.L = loader
        self.device = loader.device
        self.cuda = loader.device.type == "cuda"
        self.labels = torch.from_numpy(loader._labels)
        if not loader._is_files:
            self.images = torch.from_numpy(loader._images)  # shares memory, no copy
        self.mean = loader.mean.to(self.device)
        self.std = loader.std.to(self.device)
        self._pool = None

    def _executor(self):
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.L.num_threads,
                                            thread_name_prefix="kdseq-decode")
        return self._pool

    def _load_files(self, p, idx: np.ndarray, pos: np.ndarray) -> torch.Tensor:
        paths = [self.L._images[i] for i in idx]
        size = self.L.image_size
        if p.augment == "rrc":
            def work(k):
                h, w = aug.image_hw(paths[k], paths[k])
                box = aug.rrc_params(h, w, p.seed, p.epoch, int(pos[k]))
                return _decode_file(paths[k], box, size)
        else:
            def work(k):
                return _decode_file(paths[k], None, size)
        arrays = list(self._executor().map(work, range(len(paths))))
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"images decode to different sizes {sorted(shapes)[:3]}...; pass "
                             "image_size to resize file datasets to a common size")
        return torch.from_numpy(np.stack(arrays))

    def _make_batch(self, p, s: int, e: int) -> dict:
        idx_np = p.order[s:e]
        idx = torch.from_numpy(idx_np)
        if self.L._is_files:
            x = self._load_files(p, idx_np, np.arange(s, e))
        else:
            x = self.images.index_select(0, idx)
        y = self.labels.index_select(0, idx)
        if self.cuda:
            # Ship uint8 (4x fewer bytes than float) from pinned memory; augment on the GPU.
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
            idx = idx.pin_memory().to(self.device, non_blocking=True)
        if p.augment == "cifar":
            oy, ox, flip = (t[s:e].to(self.device, non_blocking=True) for t in p.crop_params)
            x = aug.pad_crop_flip(x, oy, ox, flip, p.padding)
        elif p.augment == "rrc":
            zeros = torch.zeros(e - s, dtype=torch.int64, device=self.device)
            x = aug.pad_crop_flip(x, zeros, zeros, p.flips[s:e].to(self.device, non_blocking=True), 0)
        return {"images": aug.normalize_nhwc(x, self.mean, self.std), "labels": y, "indices": idx}

    def iterate(self, p):
        if self.L.prefetch == 0:
            for s, e in p.spans:
                yield self._make_batch(p, s, e)
            return
        yield from self._prefetched(p)

    def _prefetched(self, p):
        # One producer thread: torch ops and PIL decoding release the GIL, so the next batches
        # are prepared while the training step runs.
        q: queue.Queue = queue.Queue(maxsize=self.L.prefetch)
        stop = threading.Event()
        done = object()

        def produce():
            # No torch.set_num_threads(1) here: it is process-wide for every thread (and every
            # extension's copy of ATen's parallel helpers) that sizes its OpenMP pool later, so the
            # training step itself ran on one core after its first kd_loss, and the torch and DALI
            # backends gave different numbers.
            try:
                for s, e in p.spans:
                    if stop.is_set():
                        return
                    item = self._make_batch(p, s, e)
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                q.put(done)
            except BaseException as exc:  # hand the error to the consumer thread
                q.put(exc)

        t = threading.Thread(target=produce, name="kdseq-prefetch", daemon=True)
        t.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            # Drain so a producer blocked on put() sees the stop flag and exits.
            while t.is_alive():
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            t.join()

    def close(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
