"""`.ci/check-gpu` and the prepared GPU call in benchmarks/README.md, checked without a GPU.

A device lease is short and rare: a renamed test, a misspelt step name or a benchmark flag that no
longer exists would spend it on an error. `CHECK_GPU_DRY_RUN=1` makes check-gpu print the commands
it would run; these tests dry-run the README's call and check every command it prints: pytest
node ids collect, benchmark arguments parse with the script's own parser (and `--plans` specs with
the kernel planner), the files named exist.
"""
import importlib
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECK_GPU = os.path.join(ROOT, ".ci", "check-gpu")
STEPS = ["build", "kernel-tests", "bench-kd-loss", "train-tests", "bench-train", "bench-scoring", "memcheck",
         "bench-kd-plans", "bench-train-compiled"]
# The device tool: one command runs at most 600 s and is at most 2,000 characters; of the 600 s,
# the call's own set-up (the Liger wheel's install, the GPU probe) and a margin need some.
COMMAND_LIMIT_S, COMMAND_SETUP_S, COMMAND_MAX_CHARS = 600, 45, 2000


def prepared_block() -> str:
    with open(os.path.join(ROOT, "benchmarks", "README.md")) as fh:
        text = fh.read()
    section = text[text.index("### The next GPU session: one prepared call"):]
    block = section[section.index("```bash\n") + len("```bash\n"):]
    return block[:block.index("```")]


def prepared_call():
    """The environment of the README's prepared call, as a dict: its last line (continuations
    joined) must be `NAME=VALUE ... bash .ci/check-gpu`; the lines before it are set-up."""
    lines = prepared_block().replace("\\\n", " ").strip().split("\n")
    tokens = shlex.split(lines[-1])
    env = {}
    while tokens and "=" in tokens[0]:
        key, value = tokens.pop(0).split("=", 1)
        env[key] = value
    assert tokens == ["bash", ".ci/check-gpu"], f"the prepared call should end in `bash .ci/check-gpu`, got {tokens}"
    return env


def check_gpu_settings():
    """The variables check-gpu reads (``${NAME:-default}``), read from the script itself so a new
    setting cannot be missed. The tests take them from their own arguments, never from the
    environment pytest runs in ("SKIP" and "OUT" are common names)."""
    with open(CHECK_GPU) as fh:
        return set(re.findall(r"\$\{(\w+):-", fh.read()))


SETTINGS = check_gpu_settings()


def dry_run(env):
    """(returncode, output, [(step, limit_s, argv)]) of check-gpu dry-run with ``env`` added."""
    full = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    full.update(env, CHECK_GPU_DRY_RUN="1", PYTHON=sys.executable)
    proc = subprocess.run(["bash", CHECK_GPU], cwd=ROOT, env=full, capture_output=True, text=True, timeout=60)
    steps = []
    for line in proc.stdout.splitlines():
        if line.startswith("== check-gpu: dry-run "):
            name, limit, command = line[len("== check-gpu: dry-run "):].split(" ", 2)
            steps.append((name, int(limit), shlex.split(command)))
    return proc.returncode, proc.stdout + proc.stderr, steps


def check_pytest_command(argv):
    """The pytest invocation collects (every node id exists) without running anything."""
    i = argv.index("pytest")
    args = [a for a in argv[i + 1:] if a not in ("-q", "-rfEs") and not a.startswith("--durations")]
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args} does not collect:\n{proc.stdout[-3000:]}\n{proc.stderr[-2000:]}"


def check_benchmark_command(argv, capsys):
    script = next(a for a in argv if a.startswith("benchmarks/"))
    args = argv[argv.index(script) + 1:]
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        module = importlib.import_module(os.path.splitext(os.path.basename(script))[0])
    finally:
        sys.path.pop(0)
    try:
        return module.build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{script} refuses {args}: {capsys.readouterr().err.strip()}")


def check_plan_specs(specs) -> bool:
    """Every ``--plans`` spec is accepted by the CUDA kernel planner; False when the extension has
    no CUDA kernels to ask."""
    import torch

    import kdseq_fast

    if not specs:
        return True
    if not kdseq_fast.build_info()["cuda_compiled"]:
        return False
    for spec in specs:
        try:
            torch.ops.kdseq._force_plan(spec)
        except RuntimeError as exc:
            pytest.fail(f"--plans {spec!r} is refused by the planner: {exc}")
        finally:
            torch.ops.kdseq._force_plan("")
    return True


def test_dry_run_without_settings_lists_every_step_and_runs_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SKIP", "build memcheck")  # the caller's environment does not leak in
    out = tmp_path / "gpu"
    rc, output, steps = dry_run({"OUT": str(out)})
    assert rc == 0, output
    assert [s[0] for s in steps] == STEPS
    assert "dry run, nothing was run" in output
    assert not out.exists()  # no log directory, no build


@pytest.mark.parametrize("env, message", [
    ({"SKIP": "bench-kd-los"}, "unknown step 'bench-kd-los'"),
    ({"ONLY": "kernel-test"}, "unknown step 'kernel-test'"),
    ({"STEP_CAPS": "build=120 bench_train=60"}, "unknown step 'bench_train'"),
    ({"STEP_CAPS": "build=2m"}, "'build=2m' is not NAME=SECONDS"),
    ({"CHECK_GPU_SECONDS": "12m"}, "CHECK_GPU_SECONDS=12m is not a number"),
])
def test_misspelt_settings_are_refused_before_anything_runs(env, message):
    rc, output, steps = dry_run(env)
    assert rc == 2 and message in output, output
    assert steps == []


def test_caps_skip_and_only_shape_the_run():
    rc, output, steps = dry_run({"ONLY": "bench-kd-loss memcheck", "STEP_CAPS": "build=100 memcheck=50",
                                 "CHECK_GPU_SECONDS": "600"})
    assert rc == 0, output
    assert [(name, limit) for name, limit, _ in steps] == [("build", 100), ("bench-kd-loss", 600), ("memcheck", 50)]
    rc, output, steps = dry_run({"SKIP": "build memcheck bench-train-compiled"})
    assert rc == 0, output
    assert [s[0] for s in steps] == [s for s in STEPS if s not in ("build", "memcheck", "bench-train-compiled")]


def test_prepared_call_fits_one_command_and_caps_every_step_it_runs():
    env = prepared_call()
    assert len(prepared_block()) <= COMMAND_MAX_CHARS, f"{len(prepared_block())} characters"
    budget = int(env["CHECK_GPU_SECONDS"])
    assert budget <= COMMAND_LIMIT_S - COMMAND_SETUP_S, f"CHECK_GPU_SECONDS={budget} outlasts one command"
    assert env.get("KEEP_GOING") == "1", "one failing step must not end the only call of the session"
    # Only the device's $OUT comes back, a few files of it: the results travel packed in one.
    assert env.get("ARCHIVE", "").startswith("$OUT/") and not env.get("OUT", "$OUT").startswith("$OUT"), env
    rc, output, steps = dry_run(env)
    assert rc == 0, output
    caps = dict(kv.split("=") for kv in env["STEP_CAPS"].split())
    # A step without its own cap in the call would get the script's default (10-20 minutes).
    assert [name for name, _, _ in steps if name not in caps] == []
    assert all(limit == min(int(caps[name]), budget) for name, limit, _ in steps), steps


def test_prepared_call_commands_are_valid(capsys):
    rc, output, steps = dry_run(prepared_call())
    assert rc == 0, output
    assert steps, output
    unchecked_plans = []
    for name, _, argv in steps:
        if "pytest" in argv:
            check_pytest_command(argv)
        elif any(a.startswith("benchmarks/") for a in argv):
            ns = check_benchmark_command(argv, capsys)
            assert getattr(ns, "device", "cuda") == "cuda", (name, argv)
            if not check_plan_specs(getattr(ns, "plans", [])):
                unchecked_plans += ns.plans
        elif name == "build":
            assert "setup.py" in argv and "build_ext" in argv and any(a.startswith("TORCH_CUDA_ARCH_LIST=") for a in argv)
        elif name == "memcheck":
            assert argv[:2] == ["env", "PYTORCH_NO_CUDA_MEMORY_CACHING=1"] and argv[2] == "compute-sanitizer", argv
            assert os.path.exists(os.path.join(ROOT, argv[-1])), argv
        else:
            pytest.fail(f"step {name} runs a command this test does not know how to check: {argv}")
    if unchecked_plans:
        pytest.skip(f"everything else checked; the extension has no CUDA kernels to check --plans {unchecked_plans}")


def test_a_renamed_test_or_flag_in_the_call_is_caught(capsys):
    # The checks above can fail: a node id that does not exist, a flag no script has, a plan spec
    # the planner refuses.
    with pytest.raises(AssertionError, match="does not collect"):
        check_pytest_command(["python3", "-m", "pytest", "-q", "-m", "cuda",
                              "tests/test_cuda_training.py::test_that_does_not_exist"])
    with pytest.raises(pytest.fail.Exception, match="refuses"):
        check_benchmark_command(["python3", "benchmarks/bench_kd_loss.py", "--device", "cuda", "--memory"],
                                capsys)
    import kdseq_fast

    if kdseq_fast.build_info()["cuda_compiled"]:
        with pytest.raises(pytest.fail.Exception, match="refused by the planner"):
            check_plan_specs(["prefer=twopass", "prefer=stage"])


FAKE_PYTHON = """#!/usr/bin/env bash
# check-gpu's $PYTHON on a machine without a GPU: the GPU probe answers 9.0, bench_kd_loss fails,
# bench_scoring ignores SIGTERM (as a trainer that checkpoints first may) and outlives its limit.
case "$*" in
  *get_device_capability*) echo 9.0; exit 0 ;;
  *bench_kd_loss.py*) echo "a row it measured"; echo "PASS    fp32 (4096, 32000) >= 85% of memcpy: 0.9"
                      echo "  NOT RUN bf16 (16, 131072): no kdseq row"; echo "a PASS in a sentence"; exit 3 ;;
  *bench_scoring.py*) echo "MISS    share of the scoring pass < 1%: 3.9%"; trap '' TERM; sleep 60; exit 0 ;;
esac
exec {python} "$@"
"""


def test_a_real_run_reports_each_step_and_packs_what_it_finished(tmp_path):
    import tarfile

    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON.format(python=shlex.quote(sys.executable)))
    fake.chmod(0o755)
    out, archive = tmp_path / "gpu", tmp_path / "back" / "check-gpu.tgz"
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    env.update(PYTHON=str(fake), OUT=str(out), ARCHIVE=str(archive), KEEP_GOING="1", SKIP="build",
               ONLY="bench-kd-loss bench-scoring", STEP_CAPS="bench-scoring=2", CHECK_GPU_SECONDS="120")
    proc = subprocess.run(["bash", CHECK_GPU], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 1, text
    assert "bench-kd-loss FAILED, exit 3" in text
    # Killed 10 s after the SIGTERM it ignored (exit 137): still a timeout, not a failure.
    assert "bench-scoring TIMED OUT after 2 s" in text, text
    assert "did not pass" in text and "bench-kd-loss bench-scoring" in text
    # Every verdict printed along the way, gathered at the end (where the tool's output tail is).
    digest = ("== check-gpu: targets (1 PASS, 1 MISS, 1 NOT RUN)\n"
              "bench-kd-loss: PASS    fp32 (4096, 32000) >= 85% of memcpy: 0.9\n"
              "bench-kd-loss: NOT RUN bf16 (16, 131072): no kdseq row\n"
              "bench-scoring: MISS    share of the scoring pass < 1%: 3.9%\n")
    assert digest in text, text
    with tarfile.open(archive) as tar:
        names = {os.path.basename(n) for n in tar.getnames()}
    assert {"info.txt", "bench-kd-loss.log", "bench-scoring.log", "targets.txt"} <= names, names
    with tarfile.open(archive) as tar:
        log = tar.extractfile(next(m for m in tar.getmembers() if m.name.endswith("bench-kd-loss.log"))).read()
    assert b"a row it measured" in log
    assert not os.path.exists(str(archive) + ".part")
    # Without KEEP_GOING the first failure stops the run: the verdicts so far still end the output.
    env.update(KEEP_GOING="0", ONLY="bench-kd-loss", OUT=str(tmp_path / "stopped"))
    proc = subprocess.run(["bash", CHECK_GPU], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "stopped at step 'bench-kd-loss'" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("bench-kd-loss: NOT RUN bf16 (16, 131072): no kdseq row"), proc.stdout


@pytest.mark.parametrize("env, message", [
    ({"STEP_CAPS": "memcheck=0"}, "'memcheck=0' is not NAME=SECONDS"),
    ({"CHECK_GPU_SECONDS": "0"}, "CHECK_GPU_SECONDS=0 is not a number"),
])
def test_a_limit_of_zero_is_refused(env, message):
    # timeout(1) reads 0 as no limit at all.
    rc, output, steps = dry_run(env)
    assert rc == 2 and message in output, output
