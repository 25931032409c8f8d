"""The dataset-level scoring pass, the teacher-logit cache and the difficulty measures."""
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import kdseq_fast as kf
from kdseq_fast.scoring import (SCORE_FIELDS, TeacherLogitCache, compute_logits, difficulty, parse_measure,
                                score_dataset)


def small_problem(n=53, classes=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, 4, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 16), torch.nn.ReLU(),
                                torch.nn.Dropout(0.5), torch.nn.Linear(16, classes))
    torch.manual_seed(seed)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return x, y, model


def loader_for(x, y, *, batch_size=8, shuffle=True, indices=None):
    idx = torch.arange(len(x)) if indices is None else indices
    ds = TensorDataset(x[idx], y[idx], idx)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(3))


def test_score_dataset_maps_every_index_once_shuffled_partial_batch():
    x, y, model = small_problem()
    teacher = torch.randn(len(x), 7)
    model.train()  # the pass must switch to eval (dropout off) and restore the mode
    scores = score_dataset(model, loader_for(x, y, batch_size=8), teacher, num_items=len(x), progress=False)
    assert model.training
    model.eval()
    with torch.no_grad():
        expected = kf.instance_scores(model(x), y, teacher, temperature=4.0)
    assert scores.shape == (len(x), 6) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    # Same result whatever the batch size / order.
    again = score_dataset(model, loader_for(x, y, batch_size=53, shuffle=False), teacher, num_items=len(x),
                          progress=False)
    torch.testing.assert_close(again, scores, rtol=1e-5, atol=1e-5)


def test_score_dataset_dict_batches_and_numpy_teacher():
    x, y, model = small_problem(n=20)
    batches = [{"images": x[i:i + 6], "labels": y[i:i + 6], "indices": torch.arange(i, min(i + 6, 20))}
               for i in range(0, 20, 6)]
    teacher = np.random.default_rng(0).normal(size=(20, 7)).astype(np.float16)
    scores = score_dataset(model, batches, teacher, num_items=20, progress=False)
    model.eval()
    with torch.no_grad():
        expected = kf.instance_scores(model(x), y, torch.from_numpy(teacher))
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunk_bytes", [1, 7 * 4 * 20, 1 << 30])
def test_score_dataset_chunks_batches_into_few_scoring_calls(monkeypatch, chunk_bytes):
    # Batches are scored in chunks of about CHUNK_BYTES of logits: one call per batch (chunk of 1
    # byte), a few calls (20-row chunks of 8-row batches), or one call for the pass; the scores and
    # the teacher-logit cache are the same whatever the chunking.
    from kdseq_fast import scoring

    x, y, model = small_problem()
    teacher = torch.randn(len(x), 7)
    calls = []
    original = scoring.instance_scores

    def counting(student, *args, **kw):
        calls.append(student.shape[0])
        return original(student, *args, **kw)

    monkeypatch.setattr(scoring, "instance_scores", counting)
    monkeypatch.setattr(scoring, "CHUNK_BYTES", chunk_bytes)
    scores = score_dataset(model, loader_for(x, y, batch_size=8), teacher, num_items=len(x), progress=False)
    logits = compute_logits(model, loader_for(x, y, batch_size=8), num_items=len(x), progress=False)
    model.eval()
    with torch.no_grad():
        expected = kf.instance_scores(model(x), y, teacher, temperature=4.0)
        torch.testing.assert_close(logits, model(x))
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)
    assert sum(calls) == len(x)
    assert len(calls) == {1: 7, 7 * 4 * 20: 3, 1 << 30: 1}[chunk_bytes], calls
    # A bad index anywhere in a chunk is still reported.
    bad = torch.arange(len(x))
    bad[-1] = len(x) + 5
    batches = [(x[i:i + 8], y[i:i + 8], bad[i:i + 8]) for i in range(0, len(x), 8)]
    with pytest.raises(ValueError, match="1 dataset indices outside"):
        score_dataset(model, batches, num_items=len(x), progress=False)


def test_score_dataset_rejects_missing_or_repeated_indices():
    x, y, model = small_problem(n=20)
    with pytest.raises(ValueError, match="exactly once"):
        score_dataset(model, loader_for(x, y, indices=torch.arange(15)), num_items=20, progress=False)
    with pytest.raises(ValueError, match="exactly once"):
        score_dataset(model, loader_for(x, y, indices=torch.tensor([0, 1, 1] + list(range(3, 20)))),
                      num_items=20, progress=False)
    with pytest.raises(ValueError, match="outside"):
        score_dataset(model, loader_for(x, y), num_items=10, progress=False)
    with pytest.raises(ValueError, match="num_items"):
        score_dataset(model, [(x, y, torch.arange(20))], progress=False)
    with pytest.raises(ValueError, match=r"teacher_logits must be \(N, C\) with N = 20"):
        score_dataset(model, loader_for(x, y), torch.zeros(5, 7), num_items=20, progress=False)


def test_bad_passes_and_tables_are_named_errors_not_wrong_results():
    x, y, model = small_problem(n=20)
    idx = torch.arange(20)
    # Float indices were truncated (2.5 -> 2: a wrong row, and the true one never written).
    with pytest.raises(ValueError, match="indices must be a 1-D integer tensor"):
        score_dataset(model, [(x, y, idx + 0.5)], num_items=20, progress=False)
    with pytest.raises(ValueError, match="20 images, 20 labels and 19 indices"):
        score_dataset(model, [(x, y, idx[:19])], num_items=20, progress=False)
    for n in (6.9, "20", True, 0):
        with pytest.raises(ValueError, match="num_items must be a positive integer"):
            score_dataset(model, [(x, y, idx)], num_items=n, progress=False)
    # numpy images and float64 teacher tables (numpy's default) are taken as they are meant.
    teacher = np.random.default_rng(0).normal(size=(20, 7))
    got = score_dataset(model, [(x.numpy(), y, idx)], teacher, num_items=20, progress=False)
    want = score_dataset(model, [(x, y, idx)], torch.from_numpy(teacher).float(), num_items=20, progress=False)
    assert torch.equal(got, want) and bool((got[:, SCORE_FIELDS.index("kd")] > 0).all())
    for table, message in ((np.zeros(20), r"must be \(N, C\)"), (np.full((20, 7), "a"), "real numbers"),
                           (torch.zeros(20, 7, device="meta"), "meta tensor"),
                           (torch.zeros(20, 7, dtype=torch.complex64), "real numbers")):
        with pytest.raises(ValueError, match=message):
            score_dataset(model, [(x, y, idx)], table, num_items=20, progress=False)
    # compute_logits: an integer dtype truncated the logits; a wrong `out` failed inside index_copy_.
    for kwargs, message in ((dict(dtype=torch.int64), "dtype must be a floating"),
                            (dict(dtype="float16"), "dtype must be a floating"),
                            (dict(out=torch.zeros(20, 6)), "out has 6 columns"),
                            (dict(out=torch.zeros(20, 7, dtype=torch.float16)), r"out must be a \(20, C\)"),
                            (dict(out=np.zeros((20, 7), np.float32)), r"out must be a \(20, C\)")):
        with pytest.raises(ValueError, match=message):
            compute_logits(model, [(x, y, idx)], num_items=20, progress=False, **kwargs)
    out = torch.full((20, 7), float("nan"))
    assert compute_logits(model, [(x, y, idx)], num_items=20, progress=False, out=out) is not None
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="meta tensor"):  # gave zeros
        difficulty(torch.rand(4, 6, device="meta"))


def test_compute_logits_matches_model():
    x, y, model = small_problem(n=30)
    model.eval()
    logits = compute_logits(model, loader_for(x, y, batch_size=7), num_items=30, progress=False)
    with torch.no_grad():
        torch.testing.assert_close(logits, model(x))


def _cache_rank_main(rank, world, init_file, dirs, out_dir):
    import datetime
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                         world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        x, y, teacher = small_problem(n=25)
        shard = loader_for(x, y, batch_size=4, indices=torch.arange(rank, 25, world))
        cache = TeacherLogitCache(dirs[rank])
        logits = cache.get(teacher, shard, num_items=25, key="digits/train", progress=False)
        torch.save({"logits": logits.clone(), "hit": cache.last_hit}, f"{out_dir}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_teacher_cache_ranks_agree_when_only_one_sees_the_file(tmp_path):
    # Rank 0's cache directory holds the logits, rank 1's does not: if each rank decided alone,
    # rank 1 would wait in the scoring all-reduce for a rank 0 that never joins it.
    x, y, teacher = small_problem(n=25)
    dirs = [str(tmp_path / "rank0"), str(tmp_path / "rank1")]
    stored = TeacherLogitCache(dirs[0]).get(teacher, loader_for(x, y), num_items=25, key="digits/train",
                                            progress=False)
    torch.multiprocessing.spawn(_cache_rank_main, args=(2, str(tmp_path / "init"), dirs, str(tmp_path)),
                                nprocs=2, join=True)
    for rank in (0, 1):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        assert res["hit"] is False  # not every rank could reuse it: all recomputed, together
        torch.testing.assert_close(res["logits"], stored)


def test_teacher_cache_keeps_passes_of_other_precisions_apart(tmp_path):
    # A bf16-autocast pass's logits are not what an fp32 run would compute: a run with amp none
    # that shares the cache directory must not train on them (and the other way round).
    x, y, teacher = small_problem(n=25)
    loader = loader_for(x, y, batch_size=10)
    bf16 = TeacherLogitCache(tmp_path).get(teacher, loader, num_items=25, key="k", amp="bf16", progress=False)
    cache = TeacherLogitCache(tmp_path)
    fp32 = cache.get(teacher, loader, num_items=25, key="k", amp="none", progress=False)
    assert cache.last_hit is False and not torch.equal(fp32, bf16)
    torch.testing.assert_close(fp32, TeacherLogitCache().get(teacher, loader, num_items=25, key="k",
                                                             progress=False))
    again = TeacherLogitCache(tmp_path)
    assert torch.equal(again.get(teacher, loader, num_items=25, key="k", amp="bf16", progress=False), bf16)
    assert again.last_hit is True
    assert torch.equal(TeacherLogitCache(tmp_path).load(teacher, num_items=25, key="k", amp="bf16"), bf16)
    assert torch.equal(TeacherLogitCache(tmp_path).load(teacher, num_items=25, key="k"), fp32)
    assert TeacherLogitCache(tmp_path).load(teacher, num_items=25, key="k", amp="fp16") is None


def test_teacher_cache_memory_disk_and_key(tmp_path):
    x, y, teacher = small_problem(n=25)
    loader = loader_for(x, y, batch_size=10)
    mem = TeacherLogitCache()
    a = mem.get(teacher, loader, num_items=25, key="digits/train", progress=False)
    assert mem.last_hit is False
    assert mem.get(teacher, loader, num_items=25, key="digits/train", progress=False) is a
    assert mem.last_hit is True

    disk = TeacherLogitCache(tmp_path)
    b = disk.get(teacher, loader, num_items=25, key="digits/train", progress=False)
    assert disk.last_hit is False
    torch.testing.assert_close(a, b)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len([f for f in files if f.endswith(".npy")]) == 1

    # load(): local lookup only (memory or a stored file), never computes.
    torch.testing.assert_close(TeacherLogitCache(tmp_path).load(teacher, num_items=25, key="digits/train"), b)
    assert TeacherLogitCache(tmp_path).load(teacher, num_items=25, key="never/stored") is None
    assert TeacherLogitCache(tmp_path).load(teacher, num_items=24, key="digits/train") is None

    second_run = TeacherLogitCache(tmp_path)
    c = second_run.get(teacher, loader, num_items=25, key="digits/train", progress=False)
    assert second_run.last_hit is True
    torch.testing.assert_close(c, b)

    # Different weights or a different dataset key -> a different entry.
    with torch.no_grad():
        teacher[1].weight.add_(1.0)
    d = TeacherLogitCache(tmp_path).get(teacher, loader, num_items=25, key="digits/train", progress=False)
    assert not torch.allclose(d, b)
    TeacherLogitCache(tmp_path).get(teacher, loader, num_items=25, key="other", progress=False)
    assert len([p for p in tmp_path.iterdir() if p.suffix == ".npy"]) == 3


def test_teacher_cache_fp16_and_corrupt_file(tmp_path):
    x, y, teacher = small_problem(n=12)
    loader = loader_for(x, y, batch_size=5)
    cache = TeacherLogitCache(tmp_path, dtype="float16")
    half = cache.get(teacher, loader, num_items=12, progress=False)
    assert half.dtype == torch.float16
    path = next(p for p in tmp_path.iterdir() if p.suffix == ".npy")
    path.write_bytes(path.read_bytes()[:40])  # truncated by a crash
    fresh = TeacherLogitCache(tmp_path, dtype="float16")
    again = fresh.get(teacher, loader, num_items=12, progress=False)
    assert fresh.last_hit is False
    torch.testing.assert_close(again, half)
    path.write_bytes(b"")  # emptied by a crash: np.load raises EOFError, not ValueError
    fresh = TeacherLogitCache(tmp_path, dtype="float16")
    torch.testing.assert_close(fresh.get(teacher, loader, num_items=12, progress=False), half)
    assert fresh.last_hit is False
    # Logits beyond float16's range would be stored as inf (NaN kd scores and KD targets later).
    with torch.no_grad():
        teacher[-1].weight.mul_(1e6)
    with pytest.raises(ValueError, match="teacher_cache_dtype=float32"):
        TeacherLogitCache(tmp_path, dtype="float16").get(teacher, loader, num_items=12, progress=False)
    with pytest.raises(ValueError, match="dtype"):
        TeacherLogitCache(tmp_path, dtype="int8")
    # The check runs in slices (a whole-table isinf took 1.5x the table): an inf in any slice counts.
    from kdseq_fast.scoring import _any_inf

    table = torch.zeros(10, 3, dtype=torch.float16)
    assert not _any_inf(table, slice_values=6)
    for row in (0, 5, 9):
        table.zero_()
        table[row, 2] = float("-inf")
        assert _any_inf(table, slice_values=6) and _any_inf(table)


def test_difficulty_measures_and_weighted_sums():
    scores = torch.tensor([[0.5, 2.0, 0.6, 1.5, 0.9, 1.0],
                           [2.0, 0.1, 0.1, -3.0, 1.8, 0.0]])
    torch.testing.assert_close(difficulty(scores, "ce"), torch.tensor([0.5, 2.0]))
    torch.testing.assert_close(difficulty(scores, "kd"), torch.tensor([2.0, 0.1]))
    torch.testing.assert_close(difficulty(scores, "1-p_true"), torch.tensor([0.4, 0.9]))
    torch.testing.assert_close(difficulty(scores, "-margin"), torch.tensor([-1.5, 3.0]))
    torch.testing.assert_close(difficulty(scores, "entropy"), torch.tensor([0.9, 1.8]))
    torch.testing.assert_close(difficulty(scores, "ce+0.5*kd"), torch.tensor([1.5, 2.05]))
    torch.testing.assert_close(difficulty(scores, " 2*ce + -1e-1*entropy "), torch.tensor([0.91, 3.82]))
    assert parse_measure("0.3*-margin+entropy") == [(0.3, "-margin"), (1.0, "entropy")]


@pytest.mark.parametrize("bad", ["", "loss", "ce+", "ce*0.5", "p_true", "ce+foo", "2*"])
def test_difficulty_unknown_measure_is_clear_error(bad):
    with pytest.raises(ValueError, match="measure"):
        difficulty(torch.zeros(3, 6), bad)


def test_difficulty_rejects_bad_shapes_and_non_finite():
    with pytest.raises(ValueError, match="shape"):
        difficulty(torch.zeros(3, 5), "ce")
    s = torch.zeros(3, 6)
    s[1, 0] = float("nan")
    with pytest.raises(ValueError, match="not finite"):
        difficulty(s, "ce")


def test_difficulty_rejects_infinite_scores_too():
    # A -inf margin (a class masked in the snapshot) or an inf ce must not sort as a difficulty.
    for column, value in (("ce", float("inf")), ("margin", float("-inf"))):
        s = torch.zeros(3, 6)
        s[1, kf.SCORE_FIELDS.index(column)] = value
        with pytest.raises(ValueError, match="not finite"):
            difficulty(s, "ce" if column == "ce" else "-margin")


def test_teacher_cache_key_says_how_the_logits_were_computed():
    # A non-deterministic CPU run's channels-last teacher gives logits a few ulp off the plain
    # layout's: a deterministic run (plain layout) must not reuse them, nor a GPU's.
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(5))
    teacher(torch.zeros(1, 3, 6, 6))
    cache = TeacherLogitCache(None)
    plain = cache.key_for(teacher, "k", 25, amp="none")
    assert cache.key_for(teacher, "k", 25, device="cuda", amp="none") != plain
    assert cache.key_for(teacher.to(memory_format=torch.channels_last), "k", 25, amp="none") != plain
    assert cache.key_for(teacher.to(memory_format=torch.contiguous_format), "k", 25, amp="none") == plain


def test_loading_a_teacher_leaves_the_global_generator_alone(tmp_path):
    # Its initial weights are overwritten; drawing them moved the stream a student's dropout uses,
    # so a teacher given as a path and as a module gave different runs.
    from kdseq_fast.config import load_config
    from kdseq_fast.models import get_model
    from kdseq_fast.run_inputs import load_teacher

    cfg = load_config(None, ["teacher.arch=resnet8", "data.image_size=16"])
    path = tmp_path / "t.pt"
    torch.save(get_model("resnet8", 10, image_size=16).state_dict(), path)
    torch.manual_seed(5)
    load_teacher(cfg, str(path), 10)
    after = torch.rand(3)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(3), after)


def test_a_cache_write_removes_what_killed_writers_left_and_keeps_live_ones(tmp_path):
    # A process killed while writing a table leaves an N x C temporary file; nothing removed it.
    import subprocess
    import sys

    from kdseq_fast.atomic_files import temp_path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        ours = temp_path(str(tmp_path / "teacher_logits_old.npy")).rsplit(".", 1)[0]
        for pid in (dead.pid, alive.pid):
            (tmp_path / os.path.basename(f"{ours}.{pid}")).write_bytes(b"partial")
        other_host = tmp_path / f".teacher_logits_old.npy.tmp.another-host.{dead.pid}"
        other_host.write_bytes(b"a write on another machine sharing the folder")
        x, y, teacher = small_problem(n=25)
        TeacherLogitCache(str(tmp_path)).get(teacher, loader_for(x, y), num_items=25, key="k", progress=False)
        left = sorted(p.name for p in tmp_path.iterdir() if ".tmp." in p.name)
        assert left == sorted([other_host.name, os.path.basename(f"{ours}.{alive.pid}")])
        assert len(list(tmp_path.glob("teacher_logits_*.json"))) == len(list(tmp_path.glob("teacher_logits_*.npy"))) == 1
    finally:
        alive.kill()


def test_teacher_cache_keeps_float32_and_float16_apart(tmp_path):
    # The stored dtype is part of the key: a float16 cache must not overwrite the float32 one.
    x, y, teacher = small_problem(n=25)
    loader = loader_for(x, y, batch_size=10)
    assert TeacherLogitCache(str(tmp_path), dtype="float32").key_for(teacher, "k", 25) != \
        TeacherLogitCache(str(tmp_path), dtype="float16").key_for(teacher, "k", 25)
    TeacherLogitCache(str(tmp_path), dtype="float32").get(teacher, loader, num_items=25, key="k", progress=False)
    TeacherLogitCache(str(tmp_path), dtype="float16").get(teacher, loader, num_items=25, key="k", progress=False)
    again = TeacherLogitCache(str(tmp_path), dtype="float32")
    again.get(teacher, loader, num_items=25, key="k", progress=False)
    assert again.last_hit is True and len(list(tmp_path.glob("*.npy"))) == 2
