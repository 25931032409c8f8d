"""Datasets in the form the CurriculumLoader takes: uint8 NHWC arrays (or image file paths) plus
int64 labels and the per-channel normalization statistics in 0-255 pixel units.

    split = get_dataset("cifar100", "./data", "train", download=True)
    split.images.shape     # (50000, 32, 32, 3) uint8
    split.mean, split.std  # per-channel, 0-255 units: normalized = (pixel - mean) / std

Names: ``cifar10``, ``cifar100``, ``svhn`` (torchvision's on-disk layout), ``cinic10`` (folder per
class under ``train/``, ``valid/``, ``test/``), ``imagefolder`` (any folder-per-class tree),
``fashion_mnist`` (the original IDX files: from ``root``, torchvision's ``FashionMNIST/raw/`` layout
under ``root``, or Debian's ``dataset-fashion-mnist`` package), ``digits`` (scikit-learn's bundled
8x8 digits, the offline default) and ``synthetic`` (seeded random data for benchmarks).
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import math
import os
import pickle
import tarfile
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from .arguments import check_int

__all__ = [
    "DatasetSplit", "DatasetNotFoundError", "get_dataset", "dataset_from_config", "DATASET_NAMES",
    "NORMALIZATION", "CINIC10_URLS", "CINIC10_MD5", "extract_cinic10", "verify_cinic10",
    "DIGITS_TEST_SIZE", "DIGITS_SPLIT_SEED", "digits_split_indices", "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_SYSTEM_DIR", "read_idx", "fashion_mnist_search_dirs", "stratified_subset",
]

DATASET_NAMES = ("cifar10", "cifar100", "svhn", "cinic10", "imagefolder", "fashion_mnist", "digits",
                 "synthetic")


def _x255(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(v * 255.0, 4) for v in values)


# Published per-channel statistics (fractions of 1, converted to 0-255 pixel units).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # Exact per-pixel std of the CIFAR-10 training set (the oft-copied 0.2023/0.1994/0.2010
    # are per-image stds, not what Normalize should use).
    "cifar10": (_x255((0.4914, 0.4822, 0.4465)), _x255((0.2470, 0.2435, 0.2616))),
    # RepDistiller / mdistiller CIFAR-100 values.
    "cifar100": (_x255((0.5071, 0.4867, 0.4408)), _x255((0.2675, 0.2565, 0.2761))),
    "svhn": (_x255((0.4377, 0.4438, 0.4728)), _x255((0.1980, 0.2010, 0.1970))),
    # From the CINIC-10 README (BayesWatch/cinic-10).
    "cinic10": (_x255((0.47889522, 0.47227842, 0.43047404)),
                _x255((0.24205776, 0.23828046, 0.25874835))),
    # ImageNet statistics, the usual default for folder-per-class photo data.
    "imagefolder": (_x255((0.485, 0.456, 0.406)), _x255((0.229, 0.224, 0.225))),
    # Per-pixel mean and std of the 60,000 Fashion-MNIST training images (one grey channel;
    # 72.9404 / 90.0212 in pixel units, checked against the files by the tests when present).
    "fashion_mnist": ((72.9404,), (90.0212,)),
}

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
# Where Debian's package `dataset-fashion-mnist` puts the original files.
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
_FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_FASHION_SIZES = {"train": 60_000, "test": 10_000}

CINIC10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")
# Official archive; the second address is the same file behind Edinburgh DataShare's newer API.
CINIC10_URLS = (
    "https://datashare.ed.ac.uk/bitstream/handle/10283/3192/CINIC-10.tar.gz",
    "https://datashare.ed.ac.uk/server/api/core/bitstreams/e8e186cc-2688-48f1-aa5a-3fda1a43f8b6/content",
)
CINIC10_MD5 = "6ee4d0c996905fe93221de577967a372"
CINIC10_PER_SPLIT = 90_000  # 9,000 per class in each of train/valid/test, 270,000 in all

DIGITS_TEST_SIZE = 360   # 1,437 train / 360 test, stratified
DIGITS_SPLIT_SEED = 0
_SYNTH_CHUNK = 1024

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DatasetNotFoundError(FileNotFoundError):
    """Raised when a dataset's files are absent; the message names them and how to download."""


@dataclass
class DatasetSplit:
    """One split of a dataset, in the form the CurriculumLoader consumes.

    ``images``: uint8 array ``[N, H, W, C]`` held in memory, or a list of N image file paths.
    ``labels``: int64 array ``[N]``. ``mean``/``std``: per-channel, 0-255 pixel units.
    ``image_size``: side length of the images (file datasets: the size the loader crops to).
    """
    images: np.ndarray | list[str]
    labels: np.ndarray
    num_classes: int
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    name: str
    split: str
    root: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_int("num_classes", self.num_classes, 1)
        kind = np.asarray(self.labels).dtype.kind
        if kind not in "iu" and not (kind in "fO" and len(self.labels) == 0):
            # A cast would truncate 1.7 to class 1 without a word.
            raise ValueError(f"labels must be integers (class indices), got {np.asarray(self.labels).dtype}")
        self.labels = np.ascontiguousarray(self.labels, dtype=np.int64)
        if self.labels.ndim != 1:
            raise ValueError(f"labels must be 1-D, got shape {self.labels.shape}")
        if len(self.images) != len(self.labels):
            raise ValueError(f"images ({len(self.images)}) and labels ({len(self.labels)}) differ in "
                             "length")
        if isinstance(self.images, np.ndarray):
            if self.images.dtype != np.uint8 or self.images.ndim != 4:
                raise ValueError("images must be a uint8 NHWC array, got "
                                 f"{self.images.dtype} with shape {self.images.shape}")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}), got range "
                             f"[{self.labels.min()}, {self.labels.max()}]")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def is_files(self) -> bool:
        """True when ``images`` are file paths to decode rather than an in-memory array."""
        return not isinstance(self.images, np.ndarray)

    def content_digest(self) -> str:
        """sha256 of what this split holds: the labels and the pixels, or for a file dataset each
        file's path, size and modification time (no decode). Another dataset of the same name and
        size, relabelled data or replaced files give another digest (the teacher-logit cache key)."""
        if getattr(self, "_digest", None) is None:
            h = hashlib.sha256()
            h.update(self.labels.tobytes())
            if self.is_files:
                for path in self.images:
                    st = os.stat(path)
                    h.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            else:
                h.update(str(self.images.shape).encode())
                h.update(memoryview(np.ascontiguousarray(self.images)).cast("B"))
            self._digest = h.hexdigest()
        return self._digest


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def get_dataset(name: str, root: str | os.PathLike = "./data", split: str = "train",
                download: bool = False, progress: bool | None = None, **kwargs: Any) -> DatasetSplit:
    """Load one split of a dataset.

    ``progress``: None or True shows bars for long work (CINIC-10's checksum and extraction,
    large synthetic sets) on a terminal only, never in a redirected log; False shows none.
    (torchvision's download bars for CIFAR/SVHN/Fashion-MNIST are its own.)

    Extra keyword arguments by dataset:
      - ``cinic10``: ``merge_valid=False`` (True: train = train + valid, as the CINIC authors suggest).
      - ``imagefolder``: ``image_size=224``, ``mean=``, ``std=`` (default: ImageNet statistics).
      - ``fashion_mnist``: ``image_size=28`` (the native size) or ``32`` (zero-padded by 2 px on
        every side, for recipes that assume CIFAR-sized inputs); one grey channel, kept as is.
      - ``digits``: ``image_size=32``.
      - ``synthetic``: ``num_items=2048``, ``num_classes=10``, ``image_size=32``, ``channels=3``,
        ``seed=0``.
    """
    if not isinstance(name, str) or name.lower() not in DATASET_NAMES:
        raise ValueError(f"unknown dataset name {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    name = name.lower()
    if not isinstance(split, str):
        raise TypeError(f"split must be a string, got {type(split).__name__}")
    valid_splits = {"cinic10": ("train", "valid", "test"), "svhn": ("train", "test", "extra")}.get(
        name, ("train", "test"))
    if split not in valid_splits:
        raise ValueError(f"split {split!r} is not valid for {name}; valid splits: "
                         f"{', '.join(valid_splits)}")
    allowed = {"cinic10": {"merge_valid"}, "imagefolder": {"image_size", "mean", "std"},
               "digits": {"image_size"}, "fashion_mnist": {"image_size"},
               "synthetic": {"num_items", "num_classes", "image_size", "channels", "seed"}}.get(
        name, set())
    extra = sorted(set(kwargs) - allowed)
    if extra:
        raise TypeError(f"get_dataset({name!r}) got unexpected keyword argument(s) {extra}; "
                        f"accepted: {sorted(allowed) or 'none'}")
    check_int("image_size", kwargs.get("image_size", 1), 1)
    if progress not in (None, False, True):
        raise TypeError(f"progress must be None, True or False, got {progress!r}")
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path (str or os.PathLike), got {type(root).__name__}")
    root = os.path.expanduser(os.fspath(root))  # a config value: no shell expanded its ~
    if name in ("cifar10", "cifar100"):
        return _load_cifar(name, root, split, download)
    if name == "svhn":
        return _load_svhn(root, split, download)
    if name == "cinic10":
        return _load_cinic10(root, split, download, bool(kwargs.get("merge_valid", False)), progress)
    if name == "imagefolder":
        return _load_imagefolder(root, split, **kwargs)
    if name == "fashion_mnist":
        return _load_fashion_mnist(root, split, download, kwargs.get("image_size", 28))
    if name == "digits":
        return _load_digits(split, kwargs.get("image_size", 32))
    return _load_synthetic(split, progress=progress, **kwargs)


def dataset_from_config(cfg: Mapping, split: str, progress: bool | None = None) -> DatasetSplit:
    """``get_dataset`` driven by a config's ``data`` section (see ``kdseq_fast.config``).

    Synthetic data always uses data seed 0, so runs with different training seeds see the same
    data and their results are comparable.
    """
    data = cfg["data"]
    name = data["name"]
    kwargs: dict[str, Any] = {}
    if name == "cinic10":
        kwargs["merge_valid"] = data["cinic_merge_valid"]
    elif name in ("digits", "imagefolder", "fashion_mnist"):
        kwargs["image_size"] = data["image_size"]
    elif name == "synthetic":
        kwargs.update(num_items=data["synthetic_train"] if split == "train" else data["synthetic_test"],
                      num_classes=data["synthetic_classes"], image_size=data["image_size"], seed=0)
    elif data["image_size"] != 32:
        raise ValueError(f"config field 'data.image_size' is {data['image_size']}, but {name} images "
                         "are 32 px; set data.image_size=32")
    out = get_dataset(name, data["root"], split, download=data["download"], progress=progress, **kwargs)
    subset = data.get("train_subset")
    if split == "train" and subset is not None and subset > len(out):
        raise ValueError(f"config field 'data.train_subset' is {subset}, but the training split of {name} "
                         f"has {len(out)} images; set it to at most {len(out)}, or null for all of them")
    if split == "train" and subset is not None and subset < len(out):
        out = stratified_subset(out, subset, seed=0)
    return out


def stratified_subset(split: DatasetSplit, num_items: int, seed: int = 0) -> DatasetSplit:
    """The first ``num_items`` of a seeded per-class shuffle, taking classes in proportion to their
    frequency (largest remainders), in ascending dataset order. The same (split, num_items, seed)
    always gives the same items, so runs on a subset stay comparable across methods and seeds.
    Normalization statistics are kept from the full split."""
    if isinstance(num_items, bool) or not isinstance(num_items, (int, np.integer)) or num_items < 1:
        raise ValueError(f"num_items must be a positive integer, got {num_items!r}")
    n = len(split)
    if num_items >= n:
        return split
    labels = split.labels
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * (num_items / n)
    take = np.floor(exact).astype(np.int64)
    # Largest remainders get the leftover items; ties go to the smaller class id.
    short = num_items - int(take.sum())
    take[np.argsort(-(exact - take), kind="stable")[:short]] += 1
    rng = np.random.default_rng([int(seed), 0x5B5E7])
    chosen = []
    for c, k in zip(classes, take):
        members = np.flatnonzero(labels == c)
        chosen.append(rng.permutation(members)[:k])
    idx = np.sort(np.concatenate(chosen))
    images = split.images[idx] if isinstance(split.images, np.ndarray) else \
        [split.images[i] for i in idx]
    return DatasetSplit(np.ascontiguousarray(images) if isinstance(images, np.ndarray) else images,
                        labels[idx], split.num_classes, list(split.classes), split.mean, split.std,
                        split.image_size, split.name, split.split, split.root)


def _missing(name: str, paths: Sequence[str], hint: str = "") -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{name} files not found: {', '.join(paths)}. Pass download=True (CLI: --set "
        f"data.download=true) to fetch them{hint}, or point root (data.root) at an existing copy.")


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (torchvision's python-pickle layout)
# --------------------------------------------------------------------------------------------
_CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "label_names", "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names",
                 "fine_labels"),
}


def _load_cifar(name: str, root: str, split: str, download: bool) -> DatasetSplit:
    folder, train_files, test_files, meta_file, names_key, labels_key = _CIFAR_LAYOUT[name]
    base = os.path.join(root, folder)
    files = train_files if split == "train" else test_files
    needed = [os.path.join(base, f) for f in files + [meta_file]]
    if download:
        import torchvision
        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        cls(root=root, train=split == "train", download=True)  # downloads and md5-checks
    missing = [p for p in needed if not os.path.isfile(p)]
    if missing:
        raise _missing(name, missing)
    images, labels = [], []
    for path in needed[:-1]:
        with open(path, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.extend(entry[labels_key])
    with open(needed[-1], "rb") as fh:
        classes = list(pickle.load(fh, encoding="latin1")[names_key])
    data = np.ascontiguousarray(np.concatenate(images).transpose(0, 2, 3, 1))
    mean, std = NORMALIZATION[name]
    return DatasetSplit(data, np.asarray(labels, dtype=np.int64), len(classes), classes, mean, std,
                        32, name, split, root)


# --------------------------------------------------------------------------------------------
# SVHN (torchvision layout: <root>/<split>_32x32.mat)
# --------------------------------------------------------------------------------------------
def _load_svhn(root: str, split: str, download: bool) -> DatasetSplit:
    path = os.path.join(root, f"{split}_32x32.mat")
    if download:
        import torchvision
        torchvision.datasets.SVHN(root=root, split=split, download=True)
    if not os.path.isfile(path):
        raise _missing("svhn", [path])
    try:
        import scipy.io
    except ImportError:
        raise ImportError("SVHN's .mat files are read with scipy, which is not installed: "
                          "pip install scipy") from None
    mat = scipy.io.loadmat(path)
    images = np.ascontiguousarray(np.asarray(mat["X"], dtype=np.uint8).transpose(3, 0, 1, 2))
    labels = np.asarray(mat["y"], dtype=np.int64).reshape(-1)
    # The .mat files label the digit 0 as 10.
    labels[labels == 10] = 0
    mean, std = NORMALIZATION["svhn"]
    return DatasetSplit(images, labels, 10, [str(d) for d in range(10)], mean, std, 32, "svhn",
                        split, root)


# --------------------------------------------------------------------------------------------
# Folder-per-class trees: CINIC-10 and generic ImageFolder
# --------------------------------------------------------------------------------------------
def _image_files_under(directory: str) -> list[str]:
    """Image files in ``directory`` and its subfolders, as torchvision's ImageFolder finds a class's
    images; hidden files and subfolders (macOS ._ files, .git) are skipped, like hidden class folders."""
    out = []
    for root, dirs, names in os.walk(directory, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        out += [os.path.join(root, n) for n in names
                if n.lower().endswith(_IMAGE_EXTENSIONS) and not n.startswith(".")]
    return out


def _scan_class_folders(directory: str, classes: Sequence[str] | None = None
                        ) -> tuple[list[str], np.ndarray, list[str]]:
    """Sorted class folders -> (file paths, labels, class names); files sorted for determinism."""
    found = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    if classes is None:
        classes = found
    elif sorted(classes) != found:
        raise ValueError(f"class folders in {directory} ({found}) differ from the expected "
                         f"classes {sorted(classes)}")
    if not classes:
        raise ValueError(f"no class folders found in {directory}")
    paths: list[str] = []
    labels: list[int] = []
    for label, cls in enumerate(classes):
        cdir = os.path.join(directory, cls)
        files = sorted(_image_files_under(cdir))
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise ValueError(f"no image files ({', '.join(_IMAGE_EXTENSIONS)}) under {directory}")
    return paths, np.asarray(labels, dtype=np.int64), list(classes)


def _cinic_dir(root: str) -> str:
    # Accept root pointing at the extracted tree itself, else use <root>/cinic10.
    if all(os.path.isdir(os.path.join(root, s)) for s in ("train", "valid", "test")):
        return root
    return os.path.join(root, "cinic10")


def _bar_disable(progress: bool | None, small: bool) -> bool | None:
    """tqdm's ``disable`` for a dataset bar: none for short work or ``progress=False``; otherwise
    None, which shows it only on a terminal, never in a redirected log."""
    return True if progress is False or small else None


def _md5(path: str, chunk: int = 1 << 20, progress: bool | None = None) -> str:
    h = hashlib.md5()
    size = os.path.getsize(path)
    with open(path, "rb") as fh, tqdm(total=size, desc=f"md5 {os.path.basename(path)}", unit="B",
                                      unit_scale=True, disable=_bar_disable(progress, size < 1 << 28)) as bar:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
            bar.update(len(block))
    return h.hexdigest()


def verify_cinic10(directory: str, per_split: int | None = CINIC10_PER_SPLIT,
                   splits: Sequence[str] = ("train", "valid", "test")) -> dict[str, int]:
    """Check the CINIC-10 layout: each split holds the 10 class folders and ``per_split`` images
    (``None`` skips the count). Returns the image count per split; raises ``ValueError``."""
    counts = {}
    for s in splits:
        d = os.path.join(directory, s)
        if not os.path.isdir(d):
            raise ValueError(f"CINIC-10 split folder missing: {d}")
        paths, _, _ = _scan_class_folders(d, CINIC10_CLASSES)
        counts[s] = len(paths)
        if per_split is not None and len(paths) != per_split:
            raise ValueError(f"CINIC-10 {s} split in {d} has {len(paths)} images, expected "
                             f"{per_split}; the archive is incomplete or was extracted partially")
    return counts


def extract_cinic10(archive: str, destination: str, *, md5: str | None = CINIC10_MD5,
                    per_split: int | None = CINIC10_PER_SPLIT, progress: bool | None = None) -> dict[str, int]:
    """Verify the archive's md5, extract it into ``destination`` and verify the layout/counts
    (``progress=False``: no bars; None: bars on a terminal).

    The archive is extracted into ``<destination>/.partial`` (the same file system as the folders,
    also when ``destination`` is a link or a mount) and its folders are moved up only once
    verified: a split folder in ``destination`` is always complete, so an extraction killed midway
    is redone by the next download instead of read as a dataset."""
    if md5 is not None:
        got = _md5(archive, progress=progress)
        if got != md5:
            raise ValueError(f"checksum mismatch for {archive}: md5 {got}, expected {md5}; delete "
                             "the file and download it again")
    import shutil

    staging = os.path.join(destination, ".partial")
    shutil.rmtree(staging, ignore_errors=True)  # a killed extraction's leftovers
    os.makedirs(staging)
    try:
        with tarfile.open(archive, "r:*") as tar:
            # getmembers() reads the whole compressed archive once before the first file is out.
            members = tar.getmembers()
            # filter="data" refuses absolute paths, '..' and links out of the destination.
            for m in tqdm(members, desc="extract CINIC-10", unit="file",
                          disable=_bar_disable(progress, len(members) < 1000)):
                tar.extract(m, staging, filter="data")
        counts = verify_cinic10(staging, per_split)
        for entry in sorted(os.listdir(staging)):
            target = os.path.join(destination, entry)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)  # an older, incomplete copy
            os.replace(os.path.join(staging, entry), target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return counts


def _download_cinic10(root: str, destination: str, progress: bool | None) -> None:
    from torchvision.datasets.utils import download_url

    archive = os.path.join(root, "CINIC-10.tar.gz")
    errors = []
    for url in CINIC10_URLS:
        try:
            # Verifies the md5 after download; reuses an already verified file.
            download_url(url, root, filename="CINIC-10.tar.gz", md5=CINIC10_MD5)
            break
        except Exception as exc:  # noqa: BLE001 - try the next mirror, report all at the end
            errors.append(f"{url}: {exc}")
    else:
        raise RuntimeError("could not download CINIC-10: " + "; ".join(errors))
    extract_cinic10(archive, destination, progress=progress)


def _load_cinic10(root: str, split: str, download: bool, merge_valid: bool,
                  progress: bool | None) -> DatasetSplit:
    directory = _cinic_dir(root)
    splits = ["train", "valid"] if (split == "train" and merge_valid) else [split]
    needed = [os.path.join(directory, s) for s in splits]
    if download and not all(os.path.isdir(p) for p in needed):
        _download_cinic10(root, directory, progress)
    missing = [p for p in needed if not os.path.isdir(p)]
    if missing:
        raise _missing("cinic10", missing, hint=f" ({CINIC10_URLS[0]}, md5 {CINIC10_MD5})")
    paths: list[str] = []
    labels = []
    for s in splits:
        p, lab, _ = _scan_class_folders(os.path.join(directory, s), CINIC10_CLASSES)
        paths += p
        labels.append(lab)
    mean, std = NORMALIZATION["cinic10"]
    return DatasetSplit(paths, np.concatenate(labels), 10, list(CINIC10_CLASSES), mean, std, 32,
                        "cinic10", split, root)


def _load_imagefolder(root: str, split: str, image_size: int = 224,
                      mean: Sequence[float] | None = None,
                      std: Sequence[float] | None = None) -> DatasetSplit:
    # ImageNet ships its held-out split as "val"; accept it for split="test".
    candidates = [split] + (["val", "validation"] if split == "test" else [])
    directory = next((os.path.join(root, c) for c in candidates
                      if os.path.isdir(os.path.join(root, c))), None)
    if directory is None:
        raise DatasetNotFoundError(
            f"imagefolder split folder not found: tried {', '.join(os.path.join(root, c) for c in candidates)}"
            "; expected <root>/<split>/<class>/<image> (no download is available for imagefolder)")
    paths, labels, classes = _scan_class_folders(directory)
    if split != "train":
        # Labels must mean the same class in every split: use the training split's class list.
        train_dir = os.path.join(root, "train")
        if os.path.isdir(train_dir):
            train_classes = sorted(e.name for e in os.scandir(train_dir)
                                   if e.is_dir() and not e.name.startswith("."))
            if train_classes != classes:
                raise ValueError(f"class folders of {directory} differ from {train_dir}")
    dmean, dstd = NORMALIZATION["imagefolder"]
    try:
        mean = tuple(float(v) for v in mean) if mean is not None else dmean
        std = tuple(float(v) for v in std) if std is not None else dstd
    except (TypeError, ValueError):
        raise ValueError(f"mean and std must be sequences of numbers (one per channel), got {mean!r}, {std!r}") from None
    if len(mean) != len(std) or not all(math.isfinite(m) for m in mean) or \
            not all(math.isfinite(s) and s > 0 for s in std):
        raise ValueError(f"mean/std must have equal length, finite values and positive std, got {mean}, {std}")
    return DatasetSplit(paths, labels, len(classes), classes, mean, std, int(image_size),
                        "imagefolder", split, root)


# --------------------------------------------------------------------------------------------
# Fashion-MNIST: the original IDX files (Zalando), 60,000 train / 10,000 test 28x28 grey images
# --------------------------------------------------------------------------------------------
def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (gzipped or not) as a numpy array: the format of MNIST and Fashion-MNIST.

    Header: two zero bytes, a type code (0x08 = uint8), the number of dimensions, then one
    big-endian uint32 per dimension. A wrong magic, another element type or a length that does
    not match the header raises ``ValueError`` naming the file."""
    path = os.fspath(path)
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            data = fh.read()
    except (OSError, EOFError) as exc:  # gzip raises these for truncated or non-gzip data
        raise ValueError(f"{path}: cannot read IDX file ({exc})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic {data[:4].hex()})")
    if data[2] != 0x08:
        raise ValueError(f"{path}: IDX element type 0x{data[2]:02x} is not uint8 (0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise ValueError(f"{path}: IDX header says shape {shape} ({expected} bytes) but the file "
                         f"holds {len(data) - header} bytes of data")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def fashion_mnist_search_dirs(root: str) -> list[str]:
    """Folders searched for the IDX files, in order: ``root``, torchvision's
    ``root/FashionMNIST/raw``, and Debian's package path."""
    return [root, os.path.join(root, "FashionMNIST", "raw"), FASHION_MNIST_SYSTEM_DIR]


def _find_idx(directory: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    return None


def _load_fashion_mnist(root: str, split: str, download: bool, image_size) -> DatasetSplit:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or \
            image_size not in (28, 32):
        raise ValueError(f"image_size for fashion_mnist must be 28 (native) or 32 (zero-padded), "
                         f"got {image_size!r}")
    if download:
        import torchvision
        torchvision.datasets.FashionMNIST(root=root, train=split == "train", download=True)
    img_stem, lab_stem = _FASHION_FILES[split]
    found = None
    for directory in fashion_mnist_search_dirs(root):
        img, lab = _find_idx(directory, img_stem), _find_idx(directory, lab_stem)
        if img and lab:
            found = (img, lab)
            break
    if found is None:
        tried = ", ".join(fashion_mnist_search_dirs(root))
        raise DatasetNotFoundError(
            f"fashion_mnist {split} files ({img_stem}[.gz], {lab_stem}[.gz]) not found in any of: "
            f"{tried}. Install them with `apt-get install dataset-fashion-mnist` (Debian, offline), "
            "or download with torchvision: pass download=True (CLI: --set data.download=true), "
            "which writes <root>/FashionMNIST/raw/.")
    images, labels = read_idx(found[0]), read_idx(found[1])
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{found[0]}: expected (N, 28, 28) images, got shape {images.shape}")
    if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"{found[1]}: {labels.shape[0] if labels.ndim == 1 else labels.shape} "
                         f"labels for {images.shape[0]} images in {found[0]}")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"{found[1]}: label {int(labels.max())} is outside the 10 classes")
    x = images[..., None]  # NHWC, one grey channel: the models take in_channels=1
    if image_size == 32:
        x = np.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)))
    mean, std = NORMALIZATION["fashion_mnist"]
    return DatasetSplit(np.ascontiguousarray(x), labels.astype(np.int64), 10,
                        list(FASHION_MNIST_CLASSES), mean, std, int(image_size), "fashion_mnist",
                        split, os.path.dirname(found[0]))


# --------------------------------------------------------------------------------------------
# digits: scikit-learn's bundled 1,797 real 8x8 handwritten digits, no download
# --------------------------------------------------------------------------------------------
def _channel_stats(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    flat = images.reshape(-1, images.shape[-1]).astype(np.float64)
    std = flat.std(axis=0)
    return tuple(round(float(v), 4) for v in flat.mean(axis=0)), \
        tuple(round(float(max(v, 1e-3)), 4) for v in std)


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the digits dataset (the demo's) comes with scikit-learn, which is not installed: "
                          "pip install 'kdseq-fast[demo]' (or scikit-learn)") from None

    bunch = load_digits()
    images, target = bunch.images.astype(np.float32), bunch.target.astype(np.int64)
    images.setflags(write=False)
    target.setflags(write=False)
    return images, target


def _digits_arrays(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    import torch
    import torch.nn.functional as F

    raw, target = _digits_raw()
    # Pixel values are 0..16 ink counts; map to 0..255 first so the interpolation works in the
    # final units.
    x = torch.from_numpy(raw * (255.0 / 16.0)).unsqueeze(1)
    if image_size != 8:
        # Bilinear (align_corners=False): smooth strokes like a real low-resolution photo,
        # instead of nearest's 4x4 blocks that a CNN could key on.
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = x.round().clamp_(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy()), target.copy()


def digits_split_indices() -> tuple[np.ndarray, np.ndarray]:
    """Fixed stratified split of the 1,797 digits: 1,437 train / 360 test (seed 0), sorted."""
    from sklearn.model_selection import train_test_split

    y = _digits_raw()[1]
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=DIGITS_TEST_SIZE,
                                           stratify=y, random_state=DIGITS_SPLIT_SEED)
    return np.sort(train_idx), np.sort(test_idx)


def _load_digits(split: str, image_size: int) -> DatasetSplit:
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 for digits, got {image_size}")
    images, labels = _digits_arrays(image_size)
    train_idx, test_idx = digits_split_indices()
    idx = train_idx if split == "train" else test_idx
    # Normalization statistics always come from the training split, whatever split is loaded.
    mean, std = _channel_stats(images[train_idx])
    return DatasetSplit(np.ascontiguousarray(images[idx]), labels[idx], 10,
                        [str(d) for d in range(10)], mean, std, image_size, "digits", split)


# --------------------------------------------------------------------------------------------
# synthetic: seeded, learnable random images (benchmarks and quick tests)
# --------------------------------------------------------------------------------------------
def _synthetic_prototypes(num_classes: int, image_size: int, channels: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 0xC1A55])
    # Each class: a mean colour plus a coarse 4x4 pattern upsampled to full size, so classes
    # differ both in colour and in spatial layout (crops and flips do not erase the signal).
    colour = rng.uniform(60, 196, size=(num_classes, 1, 1, channels))
    coarse = rng.normal(0, 40, size=(num_classes, 4, 4, channels))
    reps = -(-image_size // 4)
    pattern = np.repeat(np.repeat(coarse, reps, axis=1), reps, axis=2)[:, :image_size, :image_size]
    return (colour + pattern).astype(np.float32)


def _synthetic_chunk(protos: np.ndarray, seed: int, split_id: int, chunk: int, n: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, split_id, chunk])
    # Always draw a full chunk and cut it, so a short last chunk holds the same items as the
    # start of a full one.
    labels = rng.integers(0, protos.shape[0], size=_SYNTH_CHUNK)[:n]
    noise = rng.normal(0, 48, size=(_SYNTH_CHUNK,) + protos.shape[1:]).astype(np.float32)[:n]
    images = np.clip(protos[labels] + noise, 0, 255).round().astype(np.uint8)
    return images, labels


def _load_synthetic(split: str, num_items: int = 2048, num_classes: int = 10, image_size: int = 32,
                    channels: int = 3, seed: int = 0, progress: bool | None = None) -> DatasetSplit:
    for arg, value, lo in (("num_items", num_items, 1), ("num_classes", num_classes, 2),
                           ("image_size", image_size, 4), ("channels", channels, 1),
                           ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{arg} must be an int, got {type(value).__name__} {value!r}")
        if value < lo:
            raise ValueError(f"{arg} must be >= {lo}, got {value}")
    protos = _synthetic_prototypes(num_classes, image_size, channels, seed)
    split_id = 0 if split == "train" else 1
    # Generated in fixed-size chunks, each from its own (seed, split, chunk) stream, so item i
    # is the same whatever num_items is and memory stays bounded.
    n_chunks = -(-num_items // _SYNTH_CHUNK)
    images = np.empty((num_items, image_size, image_size, channels), dtype=np.uint8)
    labels = np.empty(num_items, dtype=np.int64)
    for c in tqdm(range(n_chunks), desc=f"synthetic {split}", unit="chunk",
                  disable=_bar_disable(progress, n_chunks < 16)):
        lo = c * _SYNTH_CHUNK
        n = min(_SYNTH_CHUNK, num_items - lo)
        images[lo:lo + n], labels[lo:lo + n] = _synthetic_chunk(protos, seed, split_id, c, n)
    # Statistics from the first training chunk: identical for every split and every num_items.
    stats_imgs, _ = _synthetic_chunk(protos, seed, 0, 0, _SYNTH_CHUNK)
    mean, std = _channel_stats(stats_imgs)
    return DatasetSplit(images, labels, num_classes, [f"class_{i}" for i in range(num_classes)],
                        mean, std, image_size, "synthetic", split)
