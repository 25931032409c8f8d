"""Dataset loaders (kdseq_fast.datasets) on generated files in the on-disk layouts, no network."""
import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest

from kdseq_fast.config import load_config
from kdseq_fast.datasets import (CINIC10_CLASSES, NORMALIZATION, DatasetNotFoundError, DatasetSplit,
                                 dataset_from_config, digits_split_indices, extract_cinic10,
                                 get_dataset)


def _rng(seed=0):
    return np.random.default_rng(seed)


# ------------------------------------------------------------------ CIFAR -------------------
def _write_pickle(path, obj):
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def make_cifar10(root, per_batch=4):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = _rng(1)
    rows = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        _write_pickle(base / name, {"data": data, "labels": labels, "batch_label": name})
        rows[name] = (data, labels)
    _write_pickle(base / "batches.meta", {"label_names": list(CINIC10_CLASSES)})
    return rows


def test_cifar10_layout(tmp_path):
    rows = make_cifar10(tmp_path)
    train = get_dataset("cifar10", tmp_path, "train")
    assert isinstance(train, DatasetSplit) and not train.is_files
    assert train.images.shape == (20, 32, 32, 3) and train.images.dtype == np.uint8
    assert train.images.flags["C_CONTIGUOUS"]
    assert len(train) == 20 and train.labels.dtype == np.int64
    expected_labels = sum((rows[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert train.labels.tolist() == expected_labels
    # Rows are stored as planes: R (1024 values), G, B, each row-major over 32x32.
    row = rows["data_batch_1"][0][2]
    for y, x, c in [(0, 0, 0), (5, 7, 1), (31, 30, 2)]:
        assert train.images[2, y, x, c] == row[c * 1024 + y * 32 + x]
    test = get_dataset("cifar10", tmp_path, "test")
    assert len(test) == 4 and test.labels.tolist() == rows["test_batch"][1]
    assert train.classes == list(CINIC10_CLASSES) and train.num_classes == 10
    assert train.mean == pytest.approx((0.4914 * 255, 0.4822 * 255, 0.4465 * 255), abs=1e-3)
    assert train.std == NORMALIZATION["cifar10"][1] and train.image_size == 32


def test_cifar100_layout(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    rng = _rng(2)
    fine = rng.integers(0, 100, size=6).tolist()
    _write_pickle(base / "train", {"data": rng.integers(0, 256, (6, 3072), dtype=np.uint8),
                                   "fine_labels": fine, "coarse_labels": [0] * 6})
    _write_pickle(base / "test", {"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8),
                                  "fine_labels": [99, 0, 5], "coarse_labels": [0] * 3})
    _write_pickle(base / "meta", {"fine_label_names": [f"c{i}" for i in range(100)],
                                  "coarse_label_names": [f"s{i}" for i in range(20)]})
    train = get_dataset("cifar100", tmp_path, "train")
    assert train.labels.tolist() == fine and train.num_classes == 100
    assert train.mean == pytest.approx(tuple(v * 255 for v in (0.5071, 0.4867, 0.4408)), abs=1e-3)
    assert get_dataset("cifar100", str(tmp_path), "test").labels.tolist() == [99, 0, 5]


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn", "cinic10"])
def test_missing_files_error(tmp_path, name):
    with pytest.raises(DatasetNotFoundError) as exc:
        get_dataset(name, tmp_path, "test")
    assert isinstance(exc.value, FileNotFoundError)
    msg = str(exc.value)
    assert str(tmp_path) in msg and "download=True" in msg and "--set data.download=true" in msg


def test_partially_missing_cifar_names_the_file(tmp_path):
    make_cifar10(tmp_path)
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(DatasetNotFoundError, match="data_batch_3") as exc:
        get_dataset("cifar10", tmp_path, "train")
    assert "data_batch_2" not in str(exc.value)


# ------------------------------------------------------------------ SVHN --------------------
def test_svhn_layout(tmp_path):
    import scipy.io
    rng = _rng(3)
    x = rng.integers(0, 256, size=(32, 32, 3, 5), dtype=np.uint8)
    y = np.array([[10], [1], [9], [10], [3]], dtype=np.uint8)
    scipy.io.savemat(tmp_path / "train_32x32.mat", {"X": x, "y": y})
    ds = get_dataset("svhn", tmp_path, "train")
    assert ds.images.shape == (5, 32, 32, 3)
    assert np.array_equal(ds.images[2], x[:, :, :, 2])
    assert ds.labels.tolist() == [0, 1, 9, 0, 3]  # the files label digit 0 as 10
    assert ds.classes == [str(d) for d in range(10)]
    assert ds.mean == NORMALIZATION["svhn"][0]


# ------------------------------------------------------------------ CINIC-10 / folders ------
def _png_bytes(rng, size=32):
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def make_cinic(directory, per_class=2, splits=("train", "valid", "test")):
    rng = _rng(4)
    for s in splits:
        for cls in CINIC10_CLASSES:
            d = directory / s / cls
            d.mkdir(parents=True)
            for i in range(per_class):
                (d / f"{cls}-{i}.png").write_bytes(_png_bytes(rng))


def test_cinic10_layout_and_merge(tmp_path):
    make_cinic(tmp_path / "cinic10")
    train = get_dataset("cinic10", tmp_path, "train")
    assert train.is_files and len(train) == 20 and train.num_classes == 10
    assert train.classes == list(CINIC10_CLASSES)
    assert train.labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert all(p.endswith(".png") and os.path.isfile(p) for p in train.images)
    assert all(os.sep + "train" + os.sep in p for p in train.images)
    valid = get_dataset("cinic10", tmp_path, "valid")
    merged = get_dataset("cinic10", tmp_path, "train", merge_valid=True)
    assert len(merged) == 40 and merged.images == train.images + valid.images
    assert merged.mean == pytest.approx((0.47889522 * 255, 0.47227842 * 255, 0.43047404 * 255),
                                        abs=1e-3)
    # root may also point straight at the extracted tree.
    assert get_dataset("cinic10", tmp_path / "cinic10", "test").images[0].startswith(
        str(tmp_path / "cinic10" / "test"))


def test_cinic10_wrong_classes(tmp_path):
    make_cinic(tmp_path / "cinic10", splits=("test",))
    os.rename(tmp_path / "cinic10" / "test" / "cat", tmp_path / "cinic10" / "test" / "kitten")
    with pytest.raises(ValueError, match="kitten"):
        get_dataset("cinic10", tmp_path, "test")


def _tar_of(tree, archive):
    with tarfile.open(archive, "w:gz") as tar:
        for s in ("train", "valid", "test"):
            tar.add(tree / s, arcname=s)
    return hashlib.md5(archive.read_bytes()).hexdigest()


def test_cinic10_archive_extraction_and_checksum(tmp_path):
    make_cinic(tmp_path / "src", per_class=1)
    archive = tmp_path / "CINIC-10.tar.gz"
    md5 = _tar_of(tmp_path / "src", archive)
    counts = extract_cinic10(str(archive), str(tmp_path / "data" / "cinic10"), md5=md5,
                             per_split=10)
    assert counts == {"train": 10, "valid": 10, "test": 10}
    assert len(get_dataset("cinic10", tmp_path / "data", "valid")) == 10
    with pytest.raises(ValueError, match="checksum mismatch"):
        extract_cinic10(str(archive), str(tmp_path / "other"), md5="0" * 32, per_split=10)
    assert not (tmp_path / "other").exists()
    # A truncated archive (wrong image count) is detected after extraction, and nothing of it is
    # left where a load would read it as the dataset.
    with pytest.raises(ValueError, match="has 10 images, expected 90000"):
        extract_cinic10(str(archive), str(tmp_path / "third"), md5=md5)
    assert not (tmp_path / "third" / "train").exists() and not (tmp_path / "third" / ".partial").exists()


def test_a_cinic10_extraction_killed_midway_is_not_read_as_the_dataset(tmp_path, monkeypatch):
    make_cinic(tmp_path / "src", per_class=1)
    archive = tmp_path / "CINIC-10.tar.gz"
    md5 = _tar_of(tmp_path / "src", archive)
    dest = tmp_path / "data" / "cinic10"
    real_extract, done = tarfile.TarFile.extract, []

    def killed_after_12(self, member, *args, **kwargs):
        if len(done) == 12:
            raise KeyboardInterrupt  # stands for the kill
        done.append(member)
        return real_extract(self, member, *args, **kwargs)

    monkeypatch.setattr(tarfile.TarFile, "extract", killed_after_12)
    with pytest.raises(KeyboardInterrupt):
        extract_cinic10(str(archive), str(dest), md5=md5, per_split=10)
    monkeypatch.undo()
    # Before: the split folders extracted so far were there, and were loaded as a smaller dataset.
    with pytest.raises(DatasetNotFoundError):
        get_dataset("cinic10", tmp_path / "data", "train")
    (dest / "train").mkdir(parents=True)  # an older, incomplete copy is replaced
    assert extract_cinic10(str(archive), str(dest), md5=md5, per_split=10) == {"train": 10, "valid": 10, "test": 10}
    assert len(get_dataset("cinic10", tmp_path / "data", "train")) == 10
    assert sorted(os.listdir(tmp_path / "data")) == ["cinic10"]
    # A cinic10 folder that links to another file system (a larger disk, a mount): the folders
    # are staged inside it, so they move in without crossing file systems.
    shm = "/dev/shm"
    if not os.path.isdir(shm) or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second file system to link to")
    import tempfile
    with tempfile.TemporaryDirectory(dir=shm) as elsewhere:
        (tmp_path / "linked").mkdir()
        os.symlink(elsewhere, tmp_path / "linked" / "cinic10")
        assert extract_cinic10(str(archive), str(tmp_path / "linked" / "cinic10"), md5=md5,
                               per_split=10) == {"train": 10, "valid": 10, "test": 10}
        assert sorted(os.listdir(elsewhere)) == ["test", "train", "valid"]


def test_cinic10_archive_with_path_traversal_is_refused(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b"x"
        info = tarfile.TarInfo("../escaped.txt")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(tarfile.TarError):
        extract_cinic10(str(archive), str(tmp_path / "dest"), md5=None, per_split=None)
    assert not (tmp_path / "escaped.txt").exists()


def test_imagefolder(tmp_path):
    rng = _rng(5)
    for split in ("train", "val"):
        for cls, n in (("b_dog", 2), ("a_cat", 3)):
            d = tmp_path / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{i}.png").write_bytes(_png_bytes(rng, 8))
            (d / "notes.txt").write_text("not an image")
    train = get_dataset("imagefolder", tmp_path, "train", image_size=64)
    assert train.classes == ["a_cat", "b_dog"] and train.labels.tolist() == [0, 0, 0, 1, 1]
    assert train.image_size == 64 and len(train.images) == 5
    test = get_dataset("imagefolder", tmp_path, "test")  # ImageNet's "val" folder
    assert len(test) == 5 and os.sep + "val" + os.sep in test.images[0]
    assert test.mean == NORMALIZATION["imagefolder"][0]
    custom = get_dataset("imagefolder", tmp_path, "train", mean=(1, 2, 3), std=(4, 5, 6))
    assert custom.mean == (1.0, 2.0, 3.0) and custom.std == (4.0, 5.0, 6.0)
    for mean, std in (((1, 2, 3), (4, float("nan"), 6)), ((1, 2, float("inf")), (4, 5, 6)), (5, (4, 5, 6))):
        with pytest.raises(ValueError, match="mean"):  # a NaN std passed the "positive std" check
            get_dataset("imagefolder", tmp_path, "train", mean=mean, std=std)
    with pytest.raises(DatasetNotFoundError, match="imagefolder"):
        get_dataset("imagefolder", tmp_path / "nothing", "train")


def test_the_teacher_cache_key_tells_datasets_of_one_size_apart(tmp_path):
    # Two folders of as many images (or relabelled data) once shared a teacher-logit cache key,
    # so a run reused the other dataset's teacher outputs as its KD targets.
    from kdseq_fast.run_inputs import build_data

    rng = _rng(7)
    for root in ("one", "two"):
        for split in ("train", "val"):
            d = tmp_path / root / split / "a"
            d.mkdir(parents=True)
            for i in range(3):
                (d / f"{i}.png").write_bytes(_png_bytes(rng, 8))
    keys = {}
    for root in ("one", "two"):
        cfg = load_config(None, ["data.name=imagefolder", f"data.root={tmp_path / root}", "data.image_size=8"])
        b = build_data(cfg)
        keys[root] = (b.key, b.test_key)
        assert b.key != b.test_key
    assert keys["one"] != keys["two"]
    assert build_data(cfg).key == keys["two"][0]  # stable for the same data

    x = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    split = DatasetSplit(x, np.array([0, 1, 0, 1]), 2, ["a", "b"], (0.0,) * 3, (1.0,) * 3, 8, "n", "train")
    same = DatasetSplit(x.copy(), np.array([0, 1, 0, 1]), 2, ["a", "b"], (0.0,) * 3, (1.0,) * 3, 8, "n", "train")
    relabelled = DatasetSplit(x, np.array([1, 1, 0, 1]), 2, ["a", "b"], (0.0,) * 3, (1.0,) * 3, 8, "n", "train")
    y = x.copy()
    y[3, 7, 7, 2] ^= 1
    one_pixel = DatasetSplit(y, np.array([0, 1, 0, 1]), 2, ["a", "b"], (0.0,) * 3, (1.0,) * 3, 8, "n", "train")
    assert split.content_digest() == same.content_digest()
    assert len({split.content_digest(), relabelled.content_digest(), one_pixel.content_digest()}) == 3


def test_a_root_with_a_tilde_is_under_home(tmp_path, monkeypatch):
    # data.root comes from a config file or --set, where no shell expands "~".
    rng = _rng(6)
    d = tmp_path / "data" / "train" / "a"
    d.mkdir(parents=True)
    (d / "0.png").write_bytes(_png_bytes(rng, 8))
    monkeypatch.setenv("HOME", str(tmp_path))
    ds = get_dataset("imagefolder", "~/data", "train")
    assert ds.images[0] == str(d / "0.png")


# ------------------------------------------------------------------ digits ------------------
def test_digits_split_is_fixed_and_stratified():
    tr1, te1 = digits_split_indices()
    tr2, te2 = digits_split_indices()
    assert np.array_equal(tr1, tr2) and np.array_equal(te1, te2)
    assert len(tr1) == 1437 and len(te1) == 360
    assert not set(tr1) & set(te1) and len(set(tr1) | set(te1)) == 1797
    # Pin the documented split itself: a change in scikit-learn's splitter would silently change
    # every digits result, so it must fail here instead.
    assert te1[:8].tolist() == [21, 24, 28, 34, 35, 37, 39, 42]
    assert hashlib.sha256(te1.astype("<i8").tobytes()).hexdigest() == \
        "2fbaae31b8c6aad12464a07771b64269876d904bfed86f77a63c8265fa201621"
    test = get_dataset("digits", split="test")
    counts = np.bincount(test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37


def test_digits_arrays():
    train = get_dataset("digits", "ignored", "train")
    again = get_dataset("digits", "ignored", "train")
    assert np.array_equal(train.images, again.images) and np.array_equal(train.labels, again.labels)
    assert train.images.shape == (1437, 32, 32, 3) and train.images.dtype == np.uint8
    assert np.array_equal(train.images[..., 0], train.images[..., 2])  # grey replicated to RGB
    assert train.images.max() >= 250 and train.images.min() == 0
    test = get_dataset("digits", split="test")
    # Statistics come from the training split whatever split is loaded.
    assert test.mean == train.mean and test.std == train.std
    flat = train.images.reshape(-1, 3).astype(np.float64)
    assert train.mean == pytest.approx(tuple(flat.mean(0)), abs=1e-3)
    assert train.std == pytest.approx(tuple(flat.std(0)), abs=1e-3)


def test_digits_values_match_sklearn_at_native_size():
    from sklearn.datasets import load_digits
    raw = load_digits()
    tr, _ = digits_split_indices()
    ds = get_dataset("digits", split="train", image_size=8)
    expected = np.round(raw.images[tr] * 255 / 16).astype(np.uint8)
    assert np.array_equal(ds.images[..., 1], expected)
    assert np.array_equal(ds.labels, raw.target[tr])


# ------------------------------------------------------------------ synthetic ---------------
def test_synthetic_reproducible_and_prefix_stable():
    a = get_dataset("synthetic", split="train", num_items=1500, num_classes=5, image_size=16, seed=3)
    b = get_dataset("synthetic", split="train", num_items=1500, num_classes=5, image_size=16, seed=3)
    c = get_dataset("synthetic", split="train", num_items=300, num_classes=5, image_size=16, seed=3)
    d = get_dataset("synthetic", split="train", num_items=300, num_classes=5, image_size=16, seed=4)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.images[:300], c.images) and a.mean == c.mean
    assert not np.array_equal(c.images, d.images)
    assert a.images.shape == (1500, 16, 16, 3) and a.num_classes == 5
    test = get_dataset("synthetic", split="test", num_items=300, num_classes=5, image_size=16, seed=3)
    assert not np.array_equal(test.images, c.images) and test.mean == c.mean


def test_dataset_bars_follow_progress(monkeypatch):
    # --quiet (progress=False) reaches the datasets: their bars showed on a terminal regardless.
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    shown = {}
    for progress in (None, False):
        monkeypatch.setattr(sys, "stderr", Terminal())
        get_dataset("synthetic", split="test", num_items=16 * 1024, image_size=4, channels=1,
                    progress=progress)
        shown[progress] = "synthetic test" in sys.stderr.getvalue()
    assert shown == {None: True, False: False}
    with pytest.raises(TypeError, match="progress must be None, True or False"):
        get_dataset("synthetic", num_items=8, progress="no")


def test_synthetic_is_learnable():
    kw = dict(num_classes=10, image_size=16, seed=0)
    train = get_dataset("synthetic", split="train", num_items=2000, **kw)
    test = get_dataset("synthetic", split="test", num_items=500, **kw)
    x = train.images.reshape(len(train), -1).astype(np.float32)
    centroids = np.stack([x[train.labels == c].mean(0) for c in range(10)])
    xt = test.images.reshape(len(test), -1).astype(np.float32)
    pred = ((xt[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    assert (pred == test.labels).mean() > 0.9
    assert np.bincount(train.labels, minlength=10).min() > 100


# ------------------------------------------------------------------ argument checks ---------
def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown dataset name 'mnist'") as exc:
        get_dataset("mnist")
    assert "cifar100" in str(exc.value)
    with pytest.raises(ValueError, match="split 'valid'"):
        get_dataset("digits", split="valid")
    with pytest.raises(TypeError, match="merge_valid"):
        get_dataset("digits", split="train", merge_valid=True)
    with pytest.raises(ValueError, match="num_items"):
        get_dataset("synthetic", split="train", num_items=0)
    with pytest.raises(TypeError, match="num_classes"):
        get_dataset("synthetic", split="train", num_classes=2.5)
    with pytest.raises(ValueError, match="length"):
        DatasetSplit(np.zeros((2, 4, 4, 3), np.uint8), np.zeros(3, np.int64), 2, ["a", "b"], (0,), (1,), 4,
                     "x", "train")
    with pytest.raises(ValueError, match="labels must lie"):
        DatasetSplit(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 2]), 2, ["a", "b"], (0,), (1,),
                     4, "x", "train")
    # Float labels were truncated (1.7 -> class 1) and any num_classes was taken.
    with pytest.raises(ValueError, match="labels must be integers"):
        DatasetSplit(np.zeros((2, 4, 4, 3), np.uint8), np.array([0.5, 1.7]), 2, ["a", "b"], (0,), (1,),
                     4, "x", "train")
    for num_classes in (2.5, 0, "2", True):
        with pytest.raises(ValueError, match="num_classes must be a positive integer"):
            DatasetSplit(np.zeros((2, 4, 4, 3), np.uint8), np.array([0, 1]), num_classes, ["a", "b"], (0,),
                         (1,), 4, "x", "train")
    for size in (16.9, "16", None, 0):  # 16.9 was taken as 16
        with pytest.raises(ValueError, match="image_size must be a positive integer"):
            get_dataset("digits", split="train", image_size=size)
    with pytest.raises(TypeError, match="root must be a path"):
        get_dataset("digits", None, "train")


def test_dataset_from_config(tmp_path):
    cfg = load_config(overrides=["data.name=synthetic", "data.synthetic_train=100",
                                 "data.synthetic_test=40", "data.synthetic_classes=3",
                                 "data.image_size=8"])
    tr, te = dataset_from_config(cfg, "train"), dataset_from_config(cfg, "test")
    assert tr.images.shape == (100, 8, 8, 3) and len(te) == 40 and tr.num_classes == 3
    digits = dataset_from_config(load_config(), "test")
    assert digits.name == "digits" and len(digits) == 360
    make_cifar10(tmp_path)
    c10 = dataset_from_config(load_config(overrides=["data.name=cifar10", f"data.root={tmp_path}"]),
                              "test")
    assert len(c10) == 4
    with pytest.raises(ValueError, match="data.image_size"):
        dataset_from_config(load_config(overrides=["data.name=cifar10", "data.image_size=64"]),
                            "train")


def test_imagefolder_finds_images_in_subfolders_as_torchvision_does(tmp_path):
    import torchvision

    rng = _rng(8)
    for rel in ("train/a/0.png", "train/a/sub/1.png", "train/a/sub/deeper/2.png", "train/b/3.png",
                "train/a/.hidden/4.png", "train/b/._5.png"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png_bytes(rng, 8))
    ds = get_dataset("imagefolder", tmp_path, "train")
    tv = torchvision.datasets.ImageFolder(str(tmp_path / "train"),
                                          is_valid_file=lambda p: not os.path.basename(p).startswith(".")
                                          and ".hidden" not in p)
    assert sorted(zip(ds.images, ds.labels.tolist())) == sorted(tv.samples)
    assert len(ds) == 4


def test_cinic10_trains_with_the_cifar_protocol_and_imagefolder_with_rrc(tmp_path):
    # CINIC-10's files are CIFAR-sized images: pad-crop-flip, as its recipes say; a generic
    # ImageFolder gets the random-resized crop of its image_size.
    from kdseq_fast.run_inputs import make_loader
    from kdseq_fast.runtime import RunContext

    import torch

    make_cinic(tmp_path / "cinic10", per_class=1)
    ctx = RunContext(torch.device("cpu"))
    cfg = load_config(None, ["data.name=cinic10", f"data.root={tmp_path}", "data.loader_backend=torch"])
    split = dataset_from_config(cfg, "train")
    assert make_loader(cfg, split, ctx, augment=True, seed=0).augment == "cifar"
    cfg = load_config(None, ["data.name=imagefolder", f"data.root={tmp_path / 'cinic10'}",
                             "data.loader_backend=torch", "data.image_size=32"])
    split = dataset_from_config(cfg, "train")
    assert make_loader(cfg, split, ctx, augment=True, seed=0).augment == "rrc"


def test_a_missing_optional_reader_says_what_to_install(tmp_path, monkeypatch):
    import sys

    from kdseq_fast import datasets

    scipy = pytest.importorskip("scipy.io")
    scipy.savemat(tmp_path / "train_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8),
                                                 "y": np.array([[1], [10]], np.uint8)})
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(ImportError, match="pip install scipy"):
        get_dataset("svhn", tmp_path, "train")
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    datasets._digits_raw.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"kdseq-fast\[demo\]"):
            get_dataset("digits", tmp_path, "train")
    finally:
        monkeypatch.undo()
        datasets._digits_raw.cache_clear()
