# `make demo` and `make test` work on a fresh machine: they create .venv if absent, install
# torch (TORCH_SPEC, the local CPU build by default), triton, the test tools and the package
# (building its native extension), then run.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.sam_kernels-installed
TEST_WORKERS ?= auto  # pytest-xdist workers (one per core); python_tests/conftest.py splits the threads
DOCS_DEPS := mkdocs mkdocstrings-python  # make docs only
DEPS := triton ninja numpy pytest pytest-xdist pytest-benchmark hypothesis scikit-learn tqdm pytorch_optimizer lightning matplotlib transformers accelerate
SOURCES := setup.py pyproject.toml sam_kernels/ops/primitives.py sam_kernels/ops/codegen.py $(wildcard csrc/*.cpp csrc/*.h csrc/generated/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)

.PHONY: install test test-slow test-all demo bench docs cuda-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# --no-compile: pip byte-compiles every module it installs (torch: 71 s of 95 on 2 cores, measured);
# Python compiles the ones a run imports, once, on first import
PIP := $(BIN)/python -m pip install -q --no-compile

$(STAMP): $(BIN)/python $(SOURCES)
	@echo "[1/4] pip" && $(PIP) --upgrade pip
	@echo "[2/4] $(TORCH_SPEC)" && $(PIP) "$(TORCH_SPEC)"
	@echo "[3/4] triton, ninja and the test tools" && \
	  $(PIP) $(DEPS) "$(TORCH_SPEC)"  # keeps torch pinned (lightning depends on torch)
	@echo "[4/4] sam_kernels and its C++ extension (ninja, a job per core: ~1.5 min on 2 cores; CUDA kernels too with nvcc and a CUDA torch)" && \
	  $(PIP) --no-build-isolation -e .
	@touch $(STAMP) && echo "installed: $(BIN)/python -m sam_kernels.info reports what was built"

install: $(STAMP)

PYTEST := $(BIN)/python -m pytest python_tests -q -p no:cacheprovider -n $(TEST_WORKERS)

test: install  # the fast tier: every kernel on every backend, every optimizer on C++ and torch
	$(PYTEST) -m "not slow"

test-slow: install  # the rest (python_tests/conftest.py): Triton sequences, multi-process, the CLIs
	$(PYTEST) -m slow

test-all: install
	$(PYTEST)

demo: install
	$(BIN)/python -m sam_kernels.demo --json demo_out/demo.json
	$(BIN)/python -m sam_kernels.bench --quick --json demo_out/bench.json --markdown demo_out/bench.md --plot demo_out/bench.png
	$(BIN)/python -m sam_kernels.memory --quick --json demo_out/memory.json --plot demo_out/memory.png
	$(BIN)/python -m sam_kernels.bench --quality --quick --json demo_out/quality.json --markdown demo_out/quality.md --plot demo_out/quality.png
	@echo "make demo: files in $(CURDIR)/demo_out:" && ls demo_out

bench: install
	$(BIN)/python -m sam_kernels.bench --quick --json bench/results/cpu-quick.json

docs: install  # the site from docs/ and the docstrings (mkdocs.yml), into site/; warnings are errors
	$(PIP) $(DOCS_DEPS) "$(TORCH_SPEC)"
	$(BIN)/python -m mkdocs build --strict

cuda-check:
	bash .ci/cuda_build_check.sh

clean:
	rm -rf build site *.egg-info sam_kernels/_C*.so $(STAMP)
