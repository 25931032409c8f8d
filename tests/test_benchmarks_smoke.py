"""Smoke runs of benchmarks/bench_kd_loss.py and bench_scoring.py (--quick, tiny shapes).

These check that the scripts run end to end and write well-formed results; they assert nothing
about speed (targets are the benchmarks' business, reported as PASS/MISS).
"""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import _common  # noqa: E402

STATUSES = {"PASS", "MISS", "NOT RUN"}


def run_script(name, out_dir, *args, timeout=300):
    cmd = [sys.executable, os.path.join(BENCH, name), "--quick", "--device", "cpu", "--out", str(out_dir), *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    stem = os.path.splitext(name)[0]
    with open(os.path.join(out_dir, f"{stem}.json")) as fh:
        payload = json.load(fh)
    with open(os.path.join(out_dir, f"{stem}.md")) as fh:
        markdown = fh.read()
    return proc.stdout, payload, markdown


def check_common(payload, stdout):
    assert {"benchmark", "command", "machine", "rows", "targets", "errors"} <= set(payload)
    assert "--quick" in payload["command"]
    assert payload["command"] in stdout
    assert {"cpu_model", "cpu_cores", "torch", "kdseq_build", "loadavg_start"} <= set(payload["machine"])
    assert isinstance(payload["machine"]["kdseq_build"], dict), payload["machine"]["kdseq_build"]
    for t in payload["targets"]:
        assert t["status"] in STATUSES
        assert f"{t['status']:7s} {t['target']}" in stdout


def test_bench_kd_loss_quick(tmp_path):
    stdout, payload, md = run_script("bench_kd_loss.py", tmp_path, "--shapes", "8x10", "16x300",
                                     "--dtypes", "fp32", "bf16", "--candidates", "kdseq", "eager",
                                     "--repeats", "2")
    check_common(payload, stdout)
    assert payload["benchmark"] == "kd_loss"
    assert payload["memcpy"]["start"]["GBps"] > 0 and payload["memcpy"]["end"]["GBps"] > 0
    cases = {(r["dtype"], r["B"], r["C"], r["candidate"]) for r in payload["rows"]}
    assert cases == {(d, b, c, k) for d in ("fp32", "bf16") for b, c in ((8, 10), (16, 300))
                     for k in ("kdseq", "eager")}
    for r in payload["rows"]:
        assert {"median_s", "q1_s", "q3_s", "iqr_s", "GBps", "roofline_fraction", "speedup_vs_eager",
                "peak_extra_bytes", "max_abs_grad_err_vs_fp64"} <= set(r)
        assert r["q1_s"] <= r["median_s"] <= r["q3_s"] and r["median_s"] > 0
        assert r["roofline_bytes"] == 3 * r["B"] * r["C"] * (4 if r["dtype"] == "fp32" else 2)
        assert math.isclose(r["GBps"], r["roofline_bytes"] / r["median_s"] / 1e9, rel_tol=1e-9)
        # Every call returns a B x C gradient it allocated, so the peak is at least that.
        assert r["peak_extra_bytes"] >= r["B"] * r["C"] * (4 if r["dtype"] == "fp32" else 2)
        assert r["max_abs_grad_err_vs_fp64"] < (1e-5 if r["dtype"] == "fp32" else 2e-2)
    # No 512x32000 row was run, so its targets must say so rather than pass or fail.
    by_name = {t["target"]: t["status"] for t in payload["targets"]}
    assert by_name["fp32 (512, 32000): kdseq speed-up vs eager"] == "NOT RUN"
    assert "| fp32 | 16 | 300 | kdseq |" in md and "Targets:" in md


def test_bench_kd_loss_plans_need_cuda(tmp_path):
    cmd = [sys.executable, os.path.join(BENCH, "bench_kd_loss.py"), "--quick", "--device", "cpu",
           "--plans", "prefer=staged", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "--plans" in proc.stderr and "cuda" in proc.stderr, proc.stderr


@pytest.mark.cuda
def test_bench_kd_loss_plan_variants_on_cuda(tmp_path):
    import torch
    stdout, payload, md = run_script("bench_kd_loss.py", tmp_path, "--device", "cuda", "--shapes", "64x32000",
                                     "--dtypes", "fp32", "--candidates", "kdseq", "eager", "--repeats", "2",
                                     "--no-memory", "--plans", "prefer=staged", "prefer=twopass")
    rows = {r["candidate"]: r for r in payload["rows"]}
    assert set(rows) == {"kdseq", "eager", "kdseq[prefer=staged]", "kdseq[prefer=twopass]"}
    for name in ("kdseq", "kdseq[prefer=staged]", "kdseq[prefer=twopass]"):
        assert rows[name]["max_abs_grad_err_vs_fp64"] < 1e-5 and rows[name]["kernel_s"] > 0, rows[name]
    if torch.cuda.get_device_capability()[0] >= 9:
        # 64 rows of 32,000 classes: a register cluster by default, staged slices when preferred;
        # twopass replaces only the split path's whole-row CTAs, so that variant keeps the cluster.
        assert rows["kdseq"]["layout"].startswith("cluster,"), rows["kdseq"]["layout"]
        assert rows["kdseq[prefer=staged]"]["layout"].startswith("staged,"), rows["kdseq[prefer=staged]"]["layout"]
        assert rows["kdseq[prefer=twopass]"]["layout"].startswith("cluster,")
    assert "| kdseq[prefer=staged] |" in md


def test_bench_scoring_quick(tmp_path):
    stdout, payload, md = run_script("bench_scoring.py", tmp_path, "--shapes", "8x10", "32x1000",
                                     "--dtypes", "fp32", "bf16", "--repeats", "2",
                                     "--pass-items", "40", "--pass-batch", "16")
    check_common(payload, stdout)
    assert payload["benchmark"] == "scoring"
    cases = {(r["dtype"], r["B"], r["C"], r["candidate"]) for r in payload["rows"]}
    assert cases == {(d, b, c, k) for d in ("fp32", "bf16") for b, c in ((8, 10), (32, 1000))
                     for k in ("kdseq", "eager")}
    for r in payload["rows"]:
        assert {"median_s", "iqr_s", "rows_per_s", "speedup_vs_eager", "max_abs_err_vs_fp64"} <= set(r)
        assert r["max_abs_err_vs_fp64"] < 1e-3
    p = payload["pass"]
    assert p["num_items"] == 40 and p["batch_size"] == 16 and len(p["passes"]) == 1
    assert 0 < p["scoring_median_s"] < p["pass_median_s"]
    assert 0 < p["scoring_share"] < 1 and 0 < p["eager_scoring_share"] < 1
    assert math.isclose(p["instances_per_s"], 40 / p["pass_median_s"], rel_tol=1e-9)
    statuses = [t for t in payload["targets"] if t["target"].startswith("fp32 (32, 1000)")]
    assert len(statuses) == 1  # C >= 1000 rows get the >= 5x target, C = 10 rows do not
    assert "Snapshot pass (resnet8x4, 40 x 3x32x32" in md


@pytest.mark.slow
def test_bench_kd_loss_with_torch_compile(tmp_path):
    stdout, payload, _ = run_script("bench_kd_loss.py", tmp_path, "--shapes", "8x10", "--dtypes", "fp32",
                                    "--candidates", "eager", "compile", "--repeats", "2", timeout=900)
    rows = {r["candidate"]: r for r in payload["rows"]}
    if "compile" not in rows:  # no working C++ toolchain for inductor: must be reported, not hidden
        assert any("compile" in k for k in payload["errors"]), payload["errors"]
        return
    assert rows["compile"]["compile_time_s"] > 0
    assert rows["compile"]["max_abs_grad_err_vs_fp64"] < 1e-5
    assert "compile time" in stdout


def test_summarize_and_target():
    st = _common.summarize([4.0, 1.0, 3.0, 2.0, 5.0])
    assert st["median_s"] == 3.0 and st["q1_s"] == 2.0 and st["q3_s"] == 4.0 and st["iqr_s"] == 2.0
    assert _common.summarize([0.5])["iqr_s"] == 0.0
    assert _common.target("x", 5.0, 5.0)["status"] == "PASS"
    assert _common.target("x", 4.9, 5.0)["status"] == "MISS"
    assert _common.target("x", 3.1, 3.0, higher_is_better=False)["status"] == "MISS"
    assert _common.target("x", None, 3.0)["status"] == "NOT RUN"


def test_bench_train_kernel_breakdown():
    import bench_train

    names = {
        "sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64": "convolution",
        "cudnn::bn_fw_tr_1C11_kernel_NCHW<float, float, int, 512, true, 1>": "batch norm",
        "void at::native::batch_norm_transform_input_channels_last_kernel<c10::BFloat16>": "batch norm",
        "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedSgdMathFunctor<float, 3>>": "optimizer",
        "void at::native::vectorized_elementwise_kernel<4, at::native::launch_clamp_scalar>": "elementwise",
        "void kdseq::kd_kernels::kd_rows_kernel<float, 8, 16, true, true>(KDArgs<float>)": "kdseq loss/scores",
        "Memcpy HtoD (Pinned -> Device)": "copy/memset",
        "void at::native::reduce_kernel<512, 1, ReduceOp<float, MeanOps>>": "reduction",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize64x64x64": "matmul",
        "some_unknown_kernel": "other",
    }
    for name, label in names.items():
        assert bench_train.kernel_class(name) == label, name
    b = bench_train.kernel_breakdown([(n, 10.0) for n in names] + [(next(iter(names)), 30.0)], top=3)
    assert b["kernel_us"] == 130.0
    assert abs(sum(b["classes"].values()) - 1.0) < 1e-12
    assert b["classes"]["convolution"] == 40.0 / 130.0 and list(b["classes"])[0] == "convolution"
    assert len(b["top"]) == 3 and b["top"][0]["us"] == 40.0 and b["top"][0]["class"] == "convolution"
    lines = bench_train.format_breakdown("kd", b, steps=2)
    assert "65 us of kernels a step" in lines[0] and "convolution 30.8%" in lines[0] and len(lines) == 4
    assert bench_train.kernel_breakdown([])["classes"] == {}


def test_markdown_table_and_outputs(tmp_path):
    md = _common.markdown_table(["a", "b"], [[1, 0.123456], ["x", None]])
    assert md.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.123 |", "| x | - |"]
    paths = _common.write_outputs(str(tmp_path / "o"), "demo", {"k": 1}, md)
    assert [os.path.basename(p) for p in paths] == ["demo.json", "demo.md"]
    with open(paths[0]) as fh:
        assert json.load(fh) == {"k": 1}


def test_interleaved_times_rejects_bad_repeats():
    import torch
    with pytest.raises(ValueError, match="repeats"):
        _common.interleaved_times({"a": lambda: None}, device=torch.device("cpu"), repeats=0, warmup=0)


def test_exit_aborts_counts_both_exits():
    cmd = [sys.executable, os.path.join(BENCH, "exit_aborts.py"), "--runs", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "# python " in proc.stdout and "exit_aborts.py --runs 1" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| plain |")
            or line.startswith("| exit_process |")]
    assert len(rows) == 2, proc.stdout
    # exit_process never aborts (the ordinary exit may: 6 jobs in 100 in benchmarks/README.md)
    assert "| exit_process | 1 | 0 | 0 |" in rows, rows


@pytest.mark.slow
def test_bench_accuracy_quick_and_resumable(tmp_path):
    out = tmp_path / "acc"
    cmd = [sys.executable, os.path.join(BENCH, "bench_accuracy.py"), "--config", "digits_quick", "--quick",
           "--device", "cpu", "--seeds", "0", "1", "--methods", "kd", "isl", "--ablation", "order",
           "--set", "data.train_subset=256", "--set", "teacher.epochs=2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert set(res["variants"]) == {"kd", "isl", "isl:order=anti", "isl:order=random"}
    isl = res["variants"]["isl"]
    assert isl["seeds"] == [0, 1] and isl["test_acc"]["n"] == 2
    assert isl["diff_vs_kd"]["ci_low"] <= isl["diff_vs_kd"]["mean"] <= isl["diff_vs_kd"]["ci_high"]
    assert {c["claim"] for c in res["claims"]} == {
        "isl - kd, lower end of the 95% CI > 0", "isl reaches the kd student's final accuracy in fewer steps"}
    for c in res["claims"]:
        assert ("PASS" if c["pass"] else "MISS") in proc.stdout
    assert (out / "accuracy_vs_steps.png").stat().st_size > 0
    assert "| isl:order=anti | 2 |" in (out / "results.md").read_text()
    # A second run reuses every finished run: it reports all 8 and trains none (no weights or
    # metrics file is written again; timing it instead failed on a loaded machine).
    def written():
        return {str(p): p.stat().st_mtime_ns for name in ("student.pt", "metrics.jsonl", "checkpoint.pt")
                for p in out.rglob(name)}
    before = written()
    assert len([p for p in before if p.endswith("student.pt")]) >= 8, sorted(before)
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    import re
    assert len(re.findall(r": test acc [0-9.]+ \(\d+ s;", again.stdout)) == 8, again.stdout
    assert written() == before
    assert json.loads((out / "results.json").read_text())["variants"]["isl"]["test_acc"] == isl["test_acc"]
    # Another --out, a changed curriculum default, the same teacher: the kd runs (which never read
    # the curriculum) are copied from the first one instead of trained again.
    out2 = tmp_path / "acc2"
    cmd2 = [c if c != str(out) else str(out2) for c in cmd if c not in ("isl", "--ablation", "order")]
    cmd2 += ["--set", "curriculum.mix_frac=0.5", "--reuse", str(out), "--teacher", str(out / "teacher" / "teacher.pt")]
    reused = subprocess.run(cmd2, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert reused.returncode == 0, reused.stderr[-3000:]
    assert reused.stdout.count("reusing the finished run") == 2, reused.stdout
    assert json.loads((out2 / "results.json").read_text())["variants"]["kd"]["test_acc"] == \
        res["variants"]["kd"]["test_acc"]
    # Reuse goes by the teacher's weights, not its path: other weights find no run to reuse (a
    # copied run would then refuse to resume with this teacher and stop the benchmark).
    import bench_accuracy as ba
    from kdseq_fast.cli import find_config
    from kdseq_fast.config import load_config

    kd_cfg = load_config(find_config("digits_quick"), ba.QUICK_OVERRIDES + ["data.train_subset=256",
                                                                           "teacher.epochs=2", "seed=0"])
    finished = json.loads((out / "runs" / "kd" / "seed0" / "run.json").read_text())
    assert finished["method"] == "kd"
    from kdseq_fast.run_dir import completed_state

    fingerprint = completed_state(str(out / "runs" / "kd" / "seed0"), "student", "kd", kd_cfg)["teacher_fingerprint"]
    assert ba.reusable_run([str(out)], 0, "kd", kd_cfg, fingerprint) == str(out / "runs" / "kd" / "seed0")
    assert ba.reusable_run([str(out)], 0, "kd", kd_cfg, "0" * 64) is None


def test_bench_scripts_exit_like_the_cli(tmp_path):
    # A mistake in a script's input was a traceback; a preempted bench_accuracy printed a traceback
    # and the CLI's advice to add --resume, a flag the script does not have (running it again is
    # what continues), and a refused run folder pointed at --overwrite, which it has not either.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "acc"
    cmd = [sys.executable, os.path.join(BENCH, "bench_accuracy.py"), "--config", "digits_quick", "--quick",
           "--device", "cpu", "--seeds", "0", "--methods", "kd", "--set", "data.train_subset=128",
           "--set", "teacher.epochs=1", "--quiet", "--out", str(out)]

    def run(*extra, **more_env):
        return subprocess.run(cmd + list(extra), cwd=ROOT, capture_output=True, text=True, timeout=900,
                              env={**env, **more_env})

    bad = run("--set", "optim.lrr=1")
    assert bad.returncode == 2 and "bench_accuracy.py: error: unknown config key 'optim.lrr'" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr
    stopped = run(KDSEQ_TEST_SIGTERM_AT_STEP="3")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "received SIGTERM" in stopped.stdout and "Run the same command again to continue" in stopped.stdout
    assert "--resume" not in stopped.stdout and "Traceback" not in stopped.stderr
    assert run().returncode == 0  # continues from the checkpoint and finishes
    assert (out / "results.json").exists()
    changed = run("--set", "optim.lr=0.07")
    assert changed.returncode == 2 and "bench_accuracy has no --overwrite" in changed.stderr, changed.stderr
    if not torch_cuda_available():
        nogpu = subprocess.run([sys.executable, os.path.join(BENCH, "bench_kd_loss.py"), "--device", "cuda"],
                               cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
        assert nogpu.returncode == 2 and "bench_kd_loss.py: error: --device cuda" in nogpu.stderr, nogpu.stderr


def test_script_main_exit_codes(capsys):
    from kdseq_fast.trainer import NonFiniteError

    def raising(exc):
        def main():
            raise exc
        return main

    assert _common.script_main(lambda: 0) == 0
    assert _common.script_main(raising(ValueError("--x must be positive"))) == 2
    assert _common.script_main(raising(NonFiniteError("loss is nan at step 3"))) == 3  # as the CLI's
    err = capsys.readouterr().err
    assert "error: --x must be positive" in err and "error: loss is nan at step 3" in err
    with pytest.raises(RuntimeError):  # anything else keeps its traceback
        _common.script_main(raising(RuntimeError("a bug")))


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def test_bench_accuracy_t_table_without_scipy(monkeypatch):
    # scipy is only in the test extra: the table must never give a narrower interval than the
    # true t quantile (a larger df's value did, e.g. df 11 -> 2.179 instead of 2.201).
    import bench_accuracy as ba

    exact = {df: ba.t_quantile_975(df) for df in (1, 2, 11, 13, 16, 25, 31, 45, 100, 500)}
    monkeypatch.setitem(sys.modules, "scipy.stats", None)  # import fails as without scipy
    for df, t in exact.items():
        table = ba.t_quantile_975(df)
        assert table >= t - 1e-3 and table - t < 0.03, (df, table, t)


def test_bench_accuracy_statistics():
    import bench_accuracy as ba

    ci = ba.mean_ci([0.01, 0.02, 0.03])
    assert ci["mean"] == pytest.approx(0.02) and ci["std"] == pytest.approx(0.01)
    assert ci["ci_low"] == pytest.approx(0.02 - 4.303 * 0.01 / math.sqrt(3), rel=1e-3)
    assert ba.mean_ci([0.5])["ci_low"] is None
    assert ba.steps_to([(10, 0.5), (20, 0.8), (30, 0.9)], 0.8) == 20
    assert ba.steps_to([(10, 0.5)], 0.8) is None
    v = ba.parse_variant("isl-root=curriculum.pacing=root,curriculum.start_frac=0.5")
    assert v.name == "isl-root" and v.method == "isl" and len(v.overrides) == 2
    assert ba.parse_variant("kd2=method=kd,loss.temperature=2").method == "kd"
    with pytest.raises(ValueError):
        ba.parse_variant("nothing")


def test_bench_accuracy_compares_steps_and_colours_on_the_same_seeds(tmp_path):
    # "kd's own steps" is averaged over the seeds where the variant reached kd's final accuracy
    # (it was over all seeds: a variant 2 epochs behind kd on its one seed read as a tie), and each
    # band has its line's colour (a one-seed variant put the band colours out of step).
    import bench_accuracy as ba

    def run(acc, steps):
        return {"test_acc": acc, "wall_s": 1.0, "history": [(s, a) for s, a in steps]}

    runs = {("kd", 0): run(0.90, [(100, 0.8), (200, 0.9)]), ("kd", 1): run(0.92, [(100, 0.92), (200, 0.92)]),
            ("isl", 0): run(0.91, [(100, 0.85), (200, 0.91)]), ("isl", 1): run(0.90, [(100, 0.85), (200, 0.90)]),
            ("ce", 0): run(0.80, [(100, 0.7), (200, 0.8)])}
    variants = [ba.Variant("ce", "ce", []), ba.Variant("kd", "kd", []), ba.Variant("isl", "isl", [])]
    stats = ba.analyse(variants, [0, 1], runs)
    st = stats["isl"]["steps_to_kd_final"]
    assert (st["reached"], st["of"], st["mean_steps"], st["kd_mean_steps"]) == (1, 2, 200.0, 200.0)
    assert "| isl | 2 | " in ba.markdown(stats, {"arch": "t", "test_acc": 0.95},
                                        {"config": "c", "command": "x", "date": "d", "machine": "m", "seeds": [0, 1]})
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    real_subplots = plt.subplots

    def keep(*a, **k):
        made.append(real_subplots(*a, **k))
        return made[-1]

    plt_close = plt.close
    try:
        plt.subplots, plt.close = keep, lambda *a, **k: None
        ba.plot(stats, runs, [0, 1], str(tmp_path / "acc.png"))
    finally:
        plt.subplots, plt.close = real_subplots, plt_close
    ax = made[0][1]
    lines = {line.get_label().split(" (")[0]: line.get_color() for line in ax.get_lines()}
    bands = [matplotlib.colors.to_hex(c.get_facecolor()[0], keep_alpha=False) for c in ax.collections]
    assert bands == [matplotlib.colors.to_hex(lines["kd"]), matplotlib.colors.to_hex(lines["isl"])]


PTXAS_LOG = """\
ptxas info    : Compiling entry function '_ZN5kdseq10kd_kernels20kd_grad_scale_kernelIfLb0EEEvPviPKT_bll' for 'sm_90'
ptxas info    : Function properties for _ZN5kdseq10kd_kernels20kd_grad_scale_kernelIfLb0EEEvPviPKT_bll
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 0 barriers
ptxas info    : Compile time = 35.477 ms
ptxas info    : Compiling entry function '_ZN5kdseq10kd_kernels14kd_rows_kernelIfLi256ELi32ELb0ELb1EEEvNS0_6KDArgsIT_EE' for 'sm_90'
ptxas info    : Function properties for _ZN5kdseq10kd_kernels14kd_rows_kernelIfLi256ELi32ELb0ELb1EEEvNS0_6KDArgsIT_EE
    200 bytes stack frame, 220 bytes spill stores, 256 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 200 bytes cumulative stack size, 560 bytes smem
"""


def test_kernel_resources_parses_ptxas_reports():
    import kernel_resources as K

    rows = K.parse_ptxas(PTXAS_LOG)
    assert [(r["registers"], r["stack"], r["spill_stores"], r["spill_loads"], r["smem"]) for r in rows] == \
        [(32, 0, 0, 0, 0), (128, 200, 220, 256, 560)]
    if rows[1]["kernel"] != rows[1]["mangled"]:  # demangled where c++filt exists
        assert rows[1]["kernel"] == "kd_rows_kernel<float, 256, 32, false, true>"
    # A report whose format no longer matches loses no kernel silently.
    with pytest.raises(RuntimeError, match="parsed 1 of the 2 kernels"):
        K.parse_ptxas(PTXAS_LOG.replace("Used 128 registers", "Uses 128 registers"))


def test_kernel_resources_reports_every_kernel(tmp_path):
    import kernel_resources as K

    if K.find_nvcc() is None:
        pytest.skip("no nvcc")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, "kernel_resources.py"), "--sources",
                           "csrc/instance_scores_cuda.cu", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "kernel_resources.json") as fh:
        payload = json.load(fh)
    kernels = {r["kernel"] for r in payload["kernels"]}
    # Every input precision of the scoring kernel, with and without a teacher.
    assert {f"instance_scores_kernel<{t}, 256, {k}>" for t in ("float", "double")
            for k in ("true", "false")} <= kernels, kernels
    assert all(r["registers"] > 0 for r in payload["kernels"])
    assert "| `instance_scores_kernel<float, 256, true>` |" in proc.stdout


def test_kd_loss_cuda_verdicts_judge_every_required_case():
    # The CUDA verdicts from rows, without a GPU: a case that was not measured, or where kdseq
    # failed (only its peers have rows), reads NOT RUN instead of vanishing, so a partial run
    # cannot read as "every shape"; the measured case gets its own PASS/MISS lines.
    import torch

    import bench_kd_loss as b

    def row(dtype, B, Cn, cand, median_s, fraction=0.9):
        return {"dtype": dtype, "B": B, "C": Cn, "candidate": cand, "median_s": median_s,
                "roofline_fraction": fraction, "graph_roofline_fraction": None, "graph_s": None,
                "gpu_s": None, "host_syncs": 0}

    rows = [row("fp32", 4096, 32000, "kdseq", 1e-3), row("fp32", 4096, 32000, "compile", 1.2e-3),
            row("fp32", 4096, 32000, "liger", 4e-3), row("bf16", 4096, 131072, "compile", 1e-3)]
    lines = _common.format_targets(b.evaluate_targets(rows, torch.device("cuda"), b.REQUIRED_CUDA_CASES))
    assert "PASS    fp32 (4096, 32000): fwd+bwd fraction of the measured memcpy (HBM) bandwidth: measured 0.9 " \
           "(target >= 0.85)" in lines
    assert "MISS    fp32 (4096, 32000): kdseq speed-up vs torch.compile: measured 1.2x (target >= 1.5x)" in lines
    not_run = {line.split(":")[0][8:] for line in lines if line.startswith("NOT RUN")}
    assert not_run == {f"{d} ({B}, {Cn})" for d, B, Cn in b.REQUIRED_CUDA_CASES} - {"fp32 (4096, 32000)"}
    assert "bf16 (4096, 131072)" in not_run and "fp32 (8192, 4096)" in not_run and "fp32 (256, 100)" in not_run
    assert "fp32 (64, 100)" not in not_run  # no target is judged there
