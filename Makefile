# Two commands do all set-up on a fresh clone:
#   make demo   - venv + torch + build, then the offline digits demo (teacher, ce, kd, isl students)
#   make test   - venv + torch + build, then the whole test suite
#   make check-gpu - on a GPU machine, with the torch already there: build, cuda tests, memcheck,
#                    CUDA benchmarks
# Everything lives in ./.venv; nothing is installed system-wide.
PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
TORCH_SPEC  ?= torch==2.14.1 torchvision==0.29.1
EXTRAS      ?= test,demo,dali,tensorboard
DEMO_OUT    ?= runs/demo
PYTEST_ARGS ?=
STAMP       := $(VENV)/.kdseq-installed
SOURCES     := setup.py $(wildcard csrc/*.h csrc/*.cuh csrc/*.cpp csrc/*.cu)

# Defaults for the build (setup.py documents them); CUDA_HOME is found by setup.py.
export TORCH_CUDA_ARCH_LIST ?= 8.0;9.0+PTX
export CCACHE_DIR ?= $(HOME)/.cache/ccache
# Paths inside the clone are hashed relative to it, so a fresh clone elsewhere reuses the cache.
export CCACHE_BASEDIR ?= $(CURDIR)
export MAX_JOBS ?= 2

.PHONY: install demo test test-cpu bench check-gpu clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel ninja

$(STAMP): $(BIN)/python $(SOURCES)
	$(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install --no-build-isolation -e ".[$(EXTRAS)]"
	$(BIN)/python -c "import kdseq_fast as kf; print('kdseq-fast build:', kf.build_info())"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/kdseq-fast demo --out $(DEMO_OUT) --resume

test: install
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/bench_kd_loss.py
	$(BIN)/python benchmarks/bench_scoring.py
	$(BIN)/python benchmarks/bench_loader.py
	$(BIN)/python benchmarks/bench_train.py

# On a GPU machine, with its own torch (no venv): build for that GPU, cuda tests, compute-sanitizer,
# the CUDA benchmarks. See .ci/check-gpu.
check-gpu:
	.ci/check-gpu

clean:
	rm -rf build kdseq_fast/_C*.so $(VENV)
