"""Fashion-MNIST loader on tiny IDX files the tests write themselves (no package needed)."""
import gzip
import os

import numpy as np
import pytest

import kdseq_fast.datasets as ds
from kdseq_fast.config import load_config
from kdseq_fast.datasets import (FASHION_MNIST_CLASSES, DatasetNotFoundError, dataset_from_config,
                                 get_dataset, read_idx, stratified_subset)


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_fashion(directory, n_train=12, n_test=5, gz=True, seed=0):
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for split, n, stem in (("train", n_train, "train"), ("test", n_test, "t10k")):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            name = os.path.join(directory, f"{stem}-{kind}-ubyte" + (".gz" if gz else ""))
            data = _idx_bytes(arr)
            with (gzip.open(name, "wb") if gz else open(name, "wb")) as fh:
                fh.write(data)
        out[split] = (images, labels)
    return out


@pytest.fixture(autouse=True)
def no_system_copy(monkeypatch, tmp_path):
    # The machine may have Debian's package installed; point the fallback at an empty folder.
    monkeypatch.setattr(ds, "FASHION_MNIST_SYSTEM_DIR", str(tmp_path / "system"))


@pytest.mark.parametrize("gz", [True, False])
def test_pixels_and_order_exactly_as_in_the_files(tmp_path, gz):
    raw = write_fashion(tmp_path / "root", gz=gz)
    for split in ("train", "test"):
        s = get_dataset("fashion_mnist", tmp_path / "root", split)
        images, labels = raw[split]
        assert s.images.shape == (len(labels), 28, 28, 1) and s.images.dtype == np.uint8
        assert s.images.flags["C_CONTIGUOUS"]
        np.testing.assert_array_equal(s.images[..., 0], images)
        np.testing.assert_array_equal(s.labels, labels.astype(np.int64))
        assert s.num_classes == 10 and s.classes == list(FASHION_MNIST_CLASSES)
        assert s.image_size == 28 and s.name == "fashion_mnist" and s.split == split
        assert len(s.mean) == len(s.std) == 1


def test_padded_to_32(tmp_path):
    raw = write_fashion(tmp_path)
    s = get_dataset("fashion_mnist", tmp_path, "train", image_size=32)
    assert s.images.shape == (12, 32, 32, 1) and s.image_size == 32
    np.testing.assert_array_equal(s.images[:, 2:30, 2:30, 0], raw["train"][0])
    assert not s.images[:, :2].any() and not s.images[:, 30:].any()
    assert not s.images[:, :, :2].any() and not s.images[:, :, 30:].any()
    with pytest.raises(ValueError, match="image_size"):
        get_dataset("fashion_mnist", tmp_path, "train", image_size=64)


def test_search_order_root_then_torchvision_then_system(tmp_path, monkeypatch):
    root = tmp_path / "root"
    system = tmp_path / "sys"
    monkeypatch.setattr(ds, "FASHION_MNIST_SYSTEM_DIR", str(system))
    sys_raw = write_fashion(system, seed=3)
    s = get_dataset("fashion_mnist", root, "train")
    np.testing.assert_array_equal(s.images[..., 0], sys_raw["train"][0])
    tv_raw = write_fashion(root / "FashionMNIST" / "raw", seed=2, gz=False)
    s = get_dataset("fashion_mnist", root, "train")
    np.testing.assert_array_equal(s.images[..., 0], tv_raw["train"][0])
    root_raw = write_fashion(root, seed=1)
    s = get_dataset("fashion_mnist", root, "train")
    np.testing.assert_array_equal(s.images[..., 0], root_raw["train"][0])


def test_missing_names_the_package_and_the_download(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        get_dataset("fashion_mnist", tmp_path, "train")
    msg = str(err.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "download" in msg and "FashionMNIST" in msg and str(tmp_path) in msg
    assert isinstance(err.value, FileNotFoundError)


def test_corrupt_files_raise_naming_the_file(tmp_path):
    write_fashion(tmp_path, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    data = path.read_bytes()
    path.write_bytes(data[:-7])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*bytes"):
        get_dataset("fashion_mnist", tmp_path, "train")
    path.write_bytes(b"\x01\x02" + data[2:])
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(str(path))
    (tmp_path / "t.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="cannot read"):
        read_idx(tmp_path / "t.gz")  # a pathlib.Path is a path too


def test_label_count_mismatch(tmp_path):
    write_fashion(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(ValueError, match="labels for 12 images"):
        get_dataset("fashion_mnist", tmp_path, "train")


def test_config_and_subset(tmp_path):
    write_fashion(tmp_path, n_train=40)
    cfg = load_config(None, [f"data.root={tmp_path}", "data.name=fashion_mnist", "data.image_size=28",
                             "data.train_subset=20"])
    train = dataset_from_config(cfg, "train")
    assert len(train) == 20 and train.images.shape[1:] == (28, 28, 1)
    # Stratified: 40 items, 4 per class -> 2 per class; the same items every time, in file order.
    assert np.bincount(train.labels, minlength=10).tolist() == [2] * 10
    again = dataset_from_config(cfg, "train")
    np.testing.assert_array_equal(train.images, again.images)
    test = dataset_from_config(cfg, "test")
    assert len(test) == 5  # the subset applies to the training split only


def test_stratified_subset_proportions():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    split = ds.DatasetSplit(np.zeros((100, 2, 2, 1), np.uint8), labels, 3, ["a", "b", "c"], (0.0,),
                            (1.0,), 2, "x", "train")
    sub = stratified_subset(split, 11, seed=0)
    assert len(sub) == 11
    assert np.bincount(sub.labels).tolist() == [6, 3, 2]  # 5.5, 3.3, 2.2 -> largest remainder
    assert stratified_subset(split, 100) is split
    with pytest.raises(ValueError, match="num_items"):
        stratified_subset(split, 0)


@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_files_statistics(monkeypatch):
    monkeypatch.setattr(ds, "FASHION_MNIST_SYSTEM_DIR", "/usr/share/datasets/fashion-mnist")
    train = get_dataset("fashion_mnist", "/nonexistent", "train")
    assert train.images.shape == (60000, 28, 28, 1)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    x = train.images.astype(np.float64)
    assert train.mean[0] == pytest.approx(x.mean(), abs=1e-3)
    assert train.std[0] == pytest.approx(x.std(), abs=1e-3)
    assert len(get_dataset("fashion_mnist", "/nonexistent", "test")) == 10000


@pytest.mark.slow
def test_documented_demo_one_liner_runs_on_fashion_mnist_files(tmp_path):
    # README: `kdseq-fast demo --config fashion_mnist_demo --out DIR` -- the packaged recipe, shrunk
    # by --set to seconds, on IDX files written here (the real files are not needed).
    import json

    from kdseq_fast import cli

    root = tmp_path / "data"
    write_fashion(root, n_train=120, n_test=30)
    shrink = ["data.train_subset=100", "teacher.epochs=1", "optim.epochs=3", "optim.lr_decay_epochs=[2]",
              "curriculum.warmup_epochs=1", "curriculum.num_phases=1", "curriculum.final_full_epochs=1",
              "student.arch=resnet8", "teacher.arch=resnet8", f"data.root={root}", "train.tensorboard=false"]
    args = ["demo", "--config", "fashion_mnist_demo", "--out", str(tmp_path / "demo"), "--quiet", "--device", "cpu"]
    for s in shrink:
        args += ["--set", s]
    assert cli.main(args) == 0
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary["methods"]) == {"ce", "kd", "isl"}
    assert all(0.0 <= m["test_acc"] <= 1.0 for m in summary["methods"].values())
