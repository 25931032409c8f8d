"""CurriculumLoader: order, pixels, sharding, resume and augmentation on both backends."""
import logging
import re

import numpy as np
import pytest
import torch

from kdseq_fast.data import CurriculumLoader
from kdseq_fast.data import augment as aug
from kdseq_fast.data import dali_backend

HAVE_DALI = dali_backend.dali_import_error() is None
BACKENDS = ["torch", pytest.param("dali", marks=pytest.mark.skipif(not HAVE_DALI, reason="no DALI"))]
MEAN = [125.3, 123.0, 113.9]
STD = [63.0, 62.1, 66.7]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (300, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 100, 300).astype(np.int64)
    return images, labels


def reference(images, idx):
    x = torch.from_numpy(images[idx]).permute(0, 3, 1, 2).float()
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def run_pass(loader):
    batches = list(loader)
    return ([b["images"] for b in batches], [b["labels"] for b in batches],
            [b["indices"] for b in batches])


@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_order_labels_pixels_without_augmentation(data, backend):
    images, labels = data
    rng = np.random.default_rng(1)
    # Repeats and a length that leaves a partial last batch (250 = 3*64 + 58).
    order = np.concatenate([rng.permutation(300)[:200], np.full(20, 7), rng.integers(0, 300, 30)])
    L = CurriculumLoader(images, labels, 64, backend=backend, augment=None, mean=MEAN, std=STD)
    assert L.backend == backend and L.num_items == 300
    L.set_order(torch.from_numpy(order))
    assert len(L) == 4
    ims, labs, idxs = run_pass(L)
    assert [len(i) for i in idxs] == [64, 64, 64, 58]
    idx = torch.cat(idxs)
    assert idx.dtype == torch.int64 and torch.equal(idx, torch.from_numpy(order))
    lab = torch.cat(labs)
    assert lab.dtype == torch.int64 and torch.equal(lab, torch.from_numpy(labels[order]))
    x = torch.cat(ims)
    assert x.dtype == torch.float32 and x.shape == (250, 3, 32, 32) and x.is_contiguous()
    torch.testing.assert_close(x, reference(images, order), rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_order_changes_every_epoch_and_epoch_counter(data, backend):
    images, labels = data
    L = CurriculumLoader(images, labels, 32, backend=backend, augment="cifar", mean=MEAN, std=STD)
    for epoch in range(3):
        order = np.random.default_rng(epoch).permutation(300)[: 100 + 37 * epoch]
        L.set_order(order)
        assert L.epoch == epoch
        _, _, idxs = run_pass(L)
        assert torch.equal(torch.cat(idxs), torch.from_numpy(order))
    # Without a new order the last one is kept.
    _, _, idxs = run_pass(L)
    assert torch.equal(torch.cat(idxs), torch.from_numpy(order)) and L.epoch == 4


def test_default_order_is_natural_and_drop_last(data):
    images, labels = data
    L = CurriculumLoader(images, labels, 64, backend="torch", augment=None, drop_last=True)
    assert len(L) == 4 and L.batches_per_epoch == 4
    _, _, idxs = run_pass(L)
    assert torch.equal(torch.cat(idxs), torch.arange(256))
    L.set_order(np.arange(64))
    assert len(L) == 1
    with pytest.raises(ValueError, match="indices"):
        L.set_order(np.arange(63))  # drop_last leaves no batch


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length,expect_batches", [(47, 5), (42, 4)])
def test_shard_union_is_the_order(data, backend, length, expect_batches):
    images, labels = data
    order = np.random.default_rng(5).integers(0, 300, length)
    world = 3
    per_rank = []
    for rank in range(world):
        L = CurriculumLoader(images, labels, 10, backend=backend, augment="cifar", shard=(rank, world),
                             mean=MEAN, std=STD, seed=11)
        L.set_order(order)
        assert len(L) == expect_batches
        per_rank.append(run_pass(L))
    # Every rank steps the same number of times; concatenating the ranks' rows of each global
    # batch, in rank order, gives the order back (42: last batch of 2 rows < 3 ranks is dropped).
    assert all(len(r[2]) == expect_batches for r in per_rank)
    union = torch.cat([torch.cat([per_rank[r][2][k] for r in range(world)])
                       for k in range(expect_batches)])
    n_kept = min(length, expect_batches * 10)
    assert torch.equal(union, torch.from_numpy(order[:n_kept]))
    assert [len(per_rank[r][2][-1]) for r in range(world)] == ([3, 2, 2] if length == 47 else [4, 3, 3])
    # Sharded augmentation equals the unsharded pass row for row.
    L = CurriculumLoader(images, labels, 10, backend=backend, augment="cifar", mean=MEAN, std=STD, seed=11)
    L.set_order(order)
    full = torch.cat(run_pass(L)[0])[:n_kept]
    sharded = torch.cat([torch.cat([per_rank[r][0][k] for r in range(world)])
                         for k in range(expect_batches)])
    assert torch.equal(full, sharded)


def _recover_crop(x):
    """From images built by `position_images`, read back (oy, ox, flip) of each output image."""
    x = x.round().to(torch.int64)  # mean 0, std 1: outputs are raw pixels
    n, _, h, w = x.shape
    rows, cols, inside = x[:, 0], x[:, 1], x[:, 2] == 255
    oy, ox, flip = [], [], []
    for b in range(n):
        ii, jj = torch.nonzero(inside[b], as_tuple=True)
        src_r = rows[b, ii, jj] - 1
        src_c = cols[b, ii, jj] - 1
        dy = torch.unique(src_r - ii)
        f = bool((src_c + jj == src_c[0] + jj[0]).all()) and len(torch.unique(jj)) > 1
        dx = torch.unique(src_c + jj - (w - 1)) if f else torch.unique(src_c - jj)
        assert len(dy) == 1 and len(dx) == 1, "crop is not a rigid window"
        # Outside the source image the window must be exactly the zero padding.
        assert (x[b][:, ~inside[b]] == 0).all()
        oy.append(int(dy) + 4)
        ox.append(int(dx) + 4)
        flip.append(int(f))
    return torch.tensor(oy), torch.tensor(ox), torch.tensor(flip)


def position_images(n):
    i = np.arange(32)
    img = np.zeros((32, 32, 3), np.uint8)
    img[..., 0] = (i[:, None] + 1)  # row + 1, so 0 marks padding
    img[..., 1] = (i[None, :] + 1)
    img[..., 2] = 255
    return np.repeat(img[None], n, axis=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cifar_augmentation_statistics_and_parameters(backend):
    n = 1200
    images = position_images(n)
    L = CurriculumLoader(images, np.zeros(n, np.int64), 200, backend=backend, augment="cifar",
                         mean=0.0, std=1.0, seed=7)
    L.set_epoch(3)
    x = torch.cat(run_pass(L)[0])
    oy, ox, flip = _recover_crop(x)
    assert oy.min() >= 0 and oy.max() <= 8 and ox.min() >= 0 and ox.max() <= 8
    assert abs(flip.float().mean().item() - 0.5) < 0.05
    for off in (oy, ox):
        freq = torch.bincount(off, minlength=9).float() / n
        assert (freq - 1 / 9).abs().max() < 0.04
    # The applied windows are exactly the documented pure function of (seed, epoch, position).
    e_oy, e_ox, e_flip = aug.cifar_params(7, 3, n, 4)
    assert torch.equal(oy, e_oy) and torch.equal(ox, e_ox) and torch.equal(flip, e_flip)


@pytest.mark.parametrize("backend", BACKENDS)
def test_crop_is_cifar_without_its_flips(data, backend):
    # data.augment: crop (SVHN: a mirrored digit is not a digit) keeps the CIFAR crops of the same
    # seed and drops every flip; the recipes turned augmentation off altogether before.
    images, labels = data

    def images_of(augment):
        L = CurriculumLoader(images, labels, 50, backend=backend, augment=augment, seed=3, mean=MEAN, std=STD)
        L.set_epoch(1)
        L.set_order(np.arange(len(labels)))
        return torch.cat(run_pass(L)[0])

    crop, cifar = images_of("crop"), images_of("cifar")
    flipped = aug.cifar_params(3, 1, len(labels), 4)[2].bool()
    assert flipped.any() and (~flipped).any()
    assert torch.equal(crop[~flipped], cifar[~flipped])
    assert torch.equal(crop[flipped], cifar[flipped].flip(-1))
    assert not torch.equal(crop, images_of(None))


def test_augmentation_seeded_by_seed_and_epoch(data):
    images, labels = data
    def images_of(seed, epoch, backend="torch"):
        L = CurriculumLoader(images, labels, 50, backend=backend, augment="cifar", seed=seed)
        L.set_epoch(epoch)
        return torch.cat(run_pass(L)[0])
    a = images_of(0, 2)
    assert torch.equal(a, images_of(0, 2))
    assert not torch.equal(a, images_of(0, 3))
    assert not torch.equal(a, images_of(1, 2))
    if HAVE_DALI:  # host-drawn parameters make the backends agree exactly
        assert torch.equal(a, images_of(0, 2, "dali"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_is_exact(data, backend):
    images, labels = data
    order = np.random.default_rng(3).integers(0, 300, 230)
    L = CurriculumLoader(images, labels, 32, backend=backend, augment="cifar", seed=5)
    L.set_epoch(4)
    L.set_order(order)
    full = run_pass(L)
    assert L.epoch == 5
    R = CurriculumLoader(images, labels, 32, backend=backend, augment="cifar", seed=5)
    R.set_epoch(4)
    R.set_order(order, start_batch=3)
    assert len(R) == len(full[0]) - 3 and R.batches_per_epoch == len(full[0])
    resumed = run_pass(R)
    for part in range(3):
        assert len(resumed[part]) == len(full[part]) - 3
        for a, b in zip(resumed[part], full[part][3:]):
            assert torch.equal(a, b)
    assert len(R) == R.batches_per_epoch and R.epoch == 5  # start_batch applies to one pass only


@pytest.mark.parametrize("backend", BACKENDS)
def test_abandoned_pass_then_new_order(data, backend):
    images, labels = data
    L = CurriculumLoader(images, labels, 16, backend=backend, augment=None)
    L.set_order(np.arange(200))
    for k, _ in enumerate(L):
        if k == 2:
            break
    assert L.epoch == 0  # an incomplete pass does not advance the epoch
    order = np.arange(299, 99, -1)
    L.set_order(order)
    _, _, idxs = run_pass(L)
    assert torch.equal(torch.cat(idxs), torch.from_numpy(order)) and L.epoch == 1


def test_prefetch_and_inline_agree_and_torch_inputs(data):
    images, labels = data
    outs = []
    for prefetch, imgs, labs in [(0, images, labels), (3, torch.from_numpy(images), labels.tolist())]:
        L = CurriculumLoader(imgs, labs, 40, backend="torch", augment="cifar", seed=2, prefetch=prefetch)
        outs.append(run_pass(L))
    for a, b in zip(outs[0][0], outs[1][0]):
        assert torch.equal(a, b)


def test_errors_name_the_argument(data):
    images, labels = data
    mk = lambda **kw: CurriculumLoader(kw.pop("images", images), kw.pop("labels", labels),
                                       kw.pop("batch_size", 8), backend="torch", **kw)
    with pytest.raises(ValueError, match="labels lengths"):
        mk(labels=labels[:-1])
    with pytest.raises(ValueError, match="uint8"):
        mk(images=images.astype(np.float32))
    with pytest.raises(ValueError, match="NCHW"):
        mk(images=np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    with pytest.raises(ValueError, match="4-D"):
        mk(images=images[0])
    with pytest.raises(ValueError, match="labels"):
        mk(labels=labels.astype(np.float32))
    with pytest.raises(ValueError, match="batch_size"):
        mk(batch_size=0)
    with pytest.raises(ValueError, match="shard"):
        mk(shard=(2, 2))
    with pytest.raises(ValueError, match="backend"):
        CurriculumLoader(images, labels, 8, backend="fast")
    with pytest.raises(ValueError, match="augment"):
        mk(augment="autoaugment")
    with pytest.raises(ValueError, match="std"):
        mk(std=[1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="mean"):
        mk(mean=[1.0, 2.0])
    meta = lambda x: torch.empty(x.shape, dtype=torch.from_numpy(x).dtype, device="meta")
    for kw, match in [
        # silently truncated or coerced before: real integers (and a bool) are required
        ({"shard": (0.9, 2.5)}, r"shard must be \(rank, world\), two integers"),
        ({"shard": "01"}, r"shard must be \(rank, world\)"),
        ({"shard": (0, 2, 1)}, r"shard must be \(rank, world\)"),
        ({"shard": (True, 2)}, r"shard must be \(rank, world\)"),
        ({"num_threads": 2.7}, "num_threads must be a positive integer"),
        ({"num_threads": 0}, "num_threads must be a positive integer"),
        ({"seed": 1.9}, "seed must be an integer"),
        ({"seed": "x"}, "seed must be an integer"),
        ({"drop_last": "no"}, "drop_last must be a bool"),
        ({"padding": True}, "padding must be a non-negative integer"),
        ({"prefetch": 1.5}, "prefetch must be a non-negative integer"),
        ({"batch_size": 2.0}, "batch_size must be a positive integer"),
        # every rank needs a row of every global batch
        ({"batch_size": 2, "shard": (3, 4)}, r"batch_size=2 .*at least the shard's world size \(4\)"),
        ({"images": np.zeros((10, 0, 0, 3), np.uint8), "labels": labels[:10]},
         "height and width >= 1"),
        ({"mean": "abc"}, "mean must be a number or one number per channel"),
        ({"std": [1.0, "x", 1.0]}, "std must be a number or one number per channel"),
        ({"device": "gpu"}, "device must be 'cpu' or 'cuda'.*got 'gpu' \\("),
        ({"labels": meta(labels)}, "labels is a tensor on the meta device"),
        ({"images": meta(images)}, "images is a tensor on the meta device"),
        ({"images": ["a.png"] * 1001 + [3], "labels": np.zeros(1002, np.int64), "augment": None},
         "file-path lists must hold str/PathLike, got int 3 at index 1001"),
        ({"images": ["a.png", b"b.png"], "labels": np.zeros(2, np.int64), "augment": None},
         "got bytes .* at index 1"),
    ]:
        with pytest.raises(ValueError, match=match):
            mk(**kw)
    # numpy integers and bools stay accepted
    L = mk(batch_size=np.int64(8), shard=(np.int64(1), np.int32(2)), num_threads=np.int64(1),
           seed=np.uint32(3), drop_last=np.bool_(True), padding=np.int64(2), prefetch=np.int64(0))
    assert (L.rank, L.world, L.num_threads, L.seed, L.drop_last) == (1, 2, 1, 3, True)
    L = mk()
    with pytest.raises(ValueError, match="indices is a tensor on the meta device"):
        L.set_order(torch.empty(4, dtype=torch.long, device="meta"))
    with pytest.raises(ValueError, match="empty"):
        L.set_order([])
    with pytest.raises(ValueError, match="out of range"):
        L.set_order([0, 300])
    with pytest.raises(ValueError, match="out of range"):
        L.set_order([-1, 3])
    with pytest.raises(ValueError, match="integers"):
        L.set_order(np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        L.set_order(np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match="start_batch"):
        L.set_order(np.arange(16), start_batch=3)
    with pytest.raises(ValueError, match="epoch"):
        L.set_epoch(-1)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device"):
            mk(device="cuda")


def test_auto_falls_back_with_one_logged_line(data, monkeypatch, caplog):
    images, labels = data
    monkeypatch.setattr(dali_backend, "_IMPORT_ERROR", "nvidia-dali not importable (test)")
    with caplog.at_level(logging.INFO, logger="kdseq_fast.data"):
        L = CurriculumLoader(images, labels, 8, backend="auto")
    assert L.backend == "torch"
    assert len(caplog.records) == 1 and "not importable (test)" in caplog.records[0].getMessage()
    with pytest.raises(RuntimeError, match="not importable"):
        CurriculumLoader(images, labels, 8, backend="dali")


def test_dali_startup_failure_falls_back_or_raises(data, monkeypatch, caplog):
    images, labels = data
    if not HAVE_DALI:
        pytest.skip("no DALI")

    def broken(self, loader):
        raise RuntimeError("CUDA driver not found")
    monkeypatch.setattr(dali_backend.DaliBackend, "__init__", broken)
    with caplog.at_level(logging.WARNING, logger="kdseq_fast.data"):
        assert CurriculumLoader(images, labels, 8, backend="auto").backend == "torch"
    assert "CUDA driver not found" in caplog.text
    with pytest.raises(RuntimeError, match="CUDA driver not found"):
        CurriculumLoader(images, labels, 8, backend="dali")


# ---------------------------------------------------------------- file datasets
@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("imgs")
    paths = []
    for k in range(10):
        h, w = 40 + 4 * k, 56 - 2 * k
        yy, xx = np.mgrid[0:h, 0:w]
        # Smooth content: resampling differences between backends stay small, crop and flip
        # differences do not.
        img = np.stack([xx * 200 // w, yy * 200 // h, np.full_like(xx, 20 * k)], -1).astype(np.uint8)
        p = root / f"{k}.png"
        Image.fromarray(img).save(p)
        paths.append(str(p))
    return paths, np.arange(10, dtype=np.int64) * 3


@pytest.mark.parametrize("augment", [None, "rrc", "cifar", "crop"])
def test_file_dataset_backends_agree(files, augment):
    if not HAVE_DALI:
        pytest.skip("no DALI")
    paths, labels = files
    order = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5])
    outs = {}
    for backend in ("torch", "dali"):
        L = CurriculumLoader(paths, labels, 4, backend=backend, augment=augment, image_size=24,
                             mean=MEAN, std=STD, seed=1)
        L.set_epoch(2)
        L.set_order(order)
        ims, labs, idxs = run_pass(L)
        assert [len(i) for i in idxs] == [4, 4, 1]
        assert torch.equal(torch.cat(idxs), torch.from_numpy(order))
        assert torch.equal(torch.cat(labs), torch.from_numpy(labels[order]))
        outs[backend] = torch.cat(ims)
        assert outs[backend].shape == (9, 3, 24, 24)
    # Same boxes and flips, different resamplers: a few pixel levels apart at most.
    diff = (outs["torch"] - outs["dali"]).abs() * torch.tensor(STD).view(1, 3, 1, 1)
    assert diff.mean() < 2.0, diff.mean()
    if augment is not None:
        # And clearly not the un-augmented view.
        L = CurriculumLoader(paths, labels, 4, backend="torch", augment=None, image_size=24,
                             mean=MEAN, std=STD)
        L.set_order(order)
        plain = torch.cat(run_pass(L)[0])
        assert ((plain - outs["torch"]).abs() * torch.tensor(STD).view(1, 3, 1, 1)).mean() > 5.0


def torch_vs_dali_levels(paths, **loader_kw) -> torch.Tensor:
    """|torch - DALI| in pixel levels, per image and pixel, for one pass over ``paths`` in order."""
    labels = np.arange(len(paths), dtype=np.int64)
    outs = {}
    for backend in ("torch", "dali"):
        L = CurriculumLoader(paths, labels, len(paths), backend=backend, mean=MEAN, std=STD, **loader_kw)
        L.set_order(np.arange(len(paths)))
        outs[backend] = torch.cat(run_pass(L)[0])
    return (outs["torch"] - outs["dali"]).abs() * torch.tensor(STD).view(1, 3, 1, 1)


@pytest.mark.parametrize("augment", [None, "cifar"])
def test_non_square_files_are_resized_and_center_cropped_alike(tmp_path, augment):
    # torchvision rounds the longer side down when it resizes the shorter one, DALI's
    # resize_shorter rounds it to nearest: where those differ (61 -> 32.5 at 45 x 61) the center
    # crop moved by a fraction of a pixel, 15-22 levels apart on detailed images. Both backends
    # now take torchvision's geometry (augment.center_view); what is left is the resamplers.
    if not HAVE_DALI:
        pytest.skip("no DALI")
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for k, (h, w) in enumerate([(45, 61), (48, 59), (61, 45), (33, 70)]):
        p = tmp_path / f"{k}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    levels = torch_vs_dali_levels(paths, augment=augment, image_size=24, seed=1).mean(dim=(1, 2, 3))
    assert (levels < 2.0).all(), levels


def test_center_view_is_torchvisions_resize_and_center_crop():
    from PIL import Image
    import torchvision.transforms.v2.functional as TF

    for h in range(20, 90, 7):
        for w in range(20, 90, 5):
            nh, nw, top, left = aug.center_view(h, w, 24)
            img = Image.fromarray(np.arange(h * w * 3, dtype=np.uint32).reshape(h, w, 3).astype(np.uint8))
            resized = TF.resize(img, 24)
            assert resized.size == (nw, nh), (h, w)
            expected = np.asarray(TF.center_crop(resized, [24, 24]))
            assert np.array_equal(np.asarray(resized)[top:top + 24, left:left + 24], expected), (h, w)


def test_file_dataset_errors(files):
    paths, labels = files
    with pytest.raises(ValueError, match="image_size"):
        CurriculumLoader(paths, labels, 4, backend="torch", augment="rrc")
    with pytest.raises(ValueError, match="rrc"):
        CurriculumLoader(np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4, np.int64), 2, augment="rrc")
    for backend in ("torch", "dali") if HAVE_DALI else ("torch",):
        L = CurriculumLoader(paths, labels, 4, backend=backend, augment=None)
        L.set_order(np.arange(len(paths)))
        with pytest.raises(ValueError, match="different sizes.*pass image_size"):
            list(L)  # decoded sizes differ and no image_size to unify them


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("augment", [None, "rrc"])
def test_a_file_that_does_not_decode_is_a_clear_error(files, tmp_path, backend, augment):
    if backend == "dali" and not HAVE_DALI:
        pytest.skip("no DALI")
    paths, labels = files
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    L = CurriculumLoader(paths[:3] + [str(broken)], labels[:4], 2, backend=backend, augment=augment,
                         image_size=24, mean=MEAN, std=STD)
    L.set_order(np.arange(4))
    # The torch backend names the file, and so does DALI: with an image_size it reads every
    # image's size on the host first (for the rrc box, or torchvision's resize and crop geometry).
    with pytest.raises(ValueError, match=re.escape(str(broken))):
        run_pass(L)


def test_dali_without_image_size_points_at_the_torch_backend_for_an_undecodable_file(tmp_path):
    # No image_size: nothing is read on the host, and DALI's decoder does not name the file.
    if not HAVE_DALI:
        pytest.skip("no DALI")
    from PIL import Image

    paths = []
    for k in range(3):
        p = tmp_path / f"{k}.png"
        Image.fromarray(np.full((16, 16, 3), 40 * k, np.uint8)).save(p)
        paths.append(str(p))
    (tmp_path / "broken.png").write_text("not an image")
    L = CurriculumLoader(paths + [str(tmp_path / "broken.png")], np.arange(4), 2, backend="dali",
                         augment=None, mean=MEAN, std=STD)
    L.set_order(np.arange(4))
    with pytest.raises(ValueError, match="could not decode an image.*loader_backend=torch"):
        run_pass(L)


# ---------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("augment", [None, "cifar"])
def test_cuda_matches_cpu(data, backend, augment):
    images, labels = data
    order = np.random.default_rng(9).integers(0, 300, 150)
    res = {}
    for device in ("cpu", "cuda"):
        L = CurriculumLoader(images, labels, 64, backend=backend, device=device, augment=augment,
                             mean=MEAN, std=STD, seed=4)
        L.set_order(order)
        ims, labs, idxs = run_pass(L)
        assert all(t.device.type == device for t in ims + labs + idxs)
        res[device] = [torch.cat(t).cpu() for t in (ims, labs, idxs)]
    for a, b in zip(res["cpu"], res["cuda"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_the_torch_backend_leaves_the_training_threads_alone():
    # torch.set_num_threads in the producer thread is process-wide for every thread (and every
    # extension's copy of ATen's parallel helpers) that sizes its pool later: the training step then
    # ran on one core after its first kd_loss, and the two backends gave different numbers.
    import subprocess
    import sys

    code = (
        "import numpy as np, torch, kdseq_fast as kf\n"
        "from kdseq_fast.data import CurriculumLoader\n"
        "torch.set_num_threads(2)\n"
        "L = CurriculumLoader(np.zeros((64, 8, 8, 3), np.uint8), np.zeros(64, np.int64), 16, backend='torch',"
        " augment='cifar', prefetch=2)\n"
        "L.set_order(np.arange(64))\n"
        "for _ in L: pass\n"
        "kf.kd_loss(torch.randn(64, 1000), torch.randn(64, 1000))\n"
        "print(torch.get_num_threads())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "2"


@pytest.mark.parametrize("augment", [None, "rrc"])
def test_exif_rotated_jpegs_read_alike_on_both_backends(tmp_path, augment):
    # DALI's decoder applied the EXIF orientation, PIL (the torch backend, torchvision) does not:
    # DALI's image was the other's transpose, and an rrc box from the stored size fell outside it
    # (a crash of the DALI pipeline).
    if not HAVE_DALI:
        pytest.skip("no DALI")
    from PIL import Image

    h, w = 40, 80
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, np.full_like(xx, 90)], -1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    paths = []
    for k in range(4):
        p = tmp_path / f"{k}.jpg"
        Image.fromarray(img).save(p, quality=95, exif=exif)
        paths.append(str(p))
    diff = torch_vs_dali_levels(paths, augment=augment, image_size=32, seed=3)
    assert diff.mean() < 3.0, diff.mean()  # resampling and JPEG decoders only


def test_augmentation_streams_differ_by_epoch_and_do_not_collide():
    # Every epoch draws new flips and crops; (seed, epoch) pairs with the same sum are not the
    # same stream (what a plain seed + epoch would give).
    assert not torch.equal(aug.flip_params(7, 0, 1000), aug.flip_params(7, 1, 1000))
    assert [aug.rrc_params(64, 64, 7, 0, p) for p in range(20)] != [aug.rrc_params(64, 64, 7, 1, p) for p in range(20)]
    assert aug._epoch_seed(0, 3) != aug._epoch_seed(1, 2)
    assert not torch.equal(aug.flip_params(0, 3, 1000), aug.flip_params(1, 2, 1000))


@pytest.mark.parametrize("backend", ["torch"])
def test_a_last_batch_of_exactly_world_rows_is_kept(data, backend):
    images, labels = data
    order = np.arange(43)  # 4 full batches of 10, then 3 rows for 3 ranks: one each
    sizes = []
    for rank in range(3):
        L = CurriculumLoader(images, labels, 10, backend=backend, augment=None, shard=(rank, 3), mean=MEAN, std=STD)
        L.set_order(order)
        sizes.append([len(i) for i in run_pass(L)[2]])
    assert [s[-1] for s in sizes] == [1, 1, 1] and all(len(s) == 5 for s in sizes)


@pytest.mark.parametrize("augment", [None, "rrc"])
def test_dali_reads_each_file_header_once_a_run(tmp_path, monkeypatch, augment):
    # The callback parsed every file's header (and computed its view) again every epoch: tens of
    # microseconds of serial Python an image, a cap of 15-40k img/s on one rank's loader.
    if not HAVE_DALI:
        pytest.skip("no DALI")
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for k, (h, w) in enumerate([(45, 61), (48, 59), (61, 45), (33, 70), (40, 40), (52, 31)]):
        p = tmp_path / f"{k}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    reads = []
    real = aug.image_hw
    monkeypatch.setattr(aug, "image_hw", lambda src, path: reads.append(path) or real(src, path))
    labels = np.arange(len(paths), dtype=np.int64)
    order = np.array([3, 1, 3, 0, 5, 2, 4, 1])
    kw = dict(backend="dali", mean=MEAN, std=STD, augment=augment, image_size=24, seed=2)
    L = CurriculumLoader(paths, labels, 3, **kw)
    passes = []
    for epoch in range(2):
        L.set_epoch(epoch)
        L.set_order(order if epoch == 0 else order[::-1].copy())
        passes.append(torch.cat(run_pass(L)[0]))
    assert sorted(reads) == sorted(set(paths))  # one read a file, the first time it is met
    # The same images as a loader that reads every header anew.
    fresh = CurriculumLoader(paths, labels, 3, **kw)
    fresh.set_epoch(1)
    fresh.set_order(order[::-1].copy())
    assert torch.equal(torch.cat(run_pass(fresh)[0]), passes[1])
