# memlm: `make train` (embedded default pretraining on CPU) and `make test`.
#
# The virtual environment is created on first use from requirements.lock: every package pinned to
# one version and checked against its sha256 (`pip --require-hashes`). The lock holds the CPU build
# of torch 2.13.0. On a machine with a CUDA driver the venv sees the system's own torch
# (--system-site-packages) and installs the same pins minus torch and triton (the CUDA torch brings
# the triton it was built with). `make lock` regenerates the lock from pyproject's ranges.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
LOCK   := requirements.lock
# Where pip finds the CPU build of torch (`torch-2.13.0+cpu`): this disk's wheel folder here;
# elsewhere set PIP_FIND_LINKS or PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
TORCH_CPU    := 2.13.0+cpu
TORCH_WHEELS ?= /opt/wheels
UV_VERSION   := 0.13.9
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_CUDA),1)
VENV_FLAGS   := --system-site-packages
LOCK_FILTER  := awk '/^(torch|triton)==/{skip=1;next} /^[^ ]/{skip=0} !skip'
else
VENV_FLAGS   :=
LOCK_FILTER  := cat
endif
PYTEST_ARGS ?=
ARGS ?=

.PHONY: venv lock train test test-slow test-gpu test-all test-compat lint bench clean gpu-wheels

venv: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(LOCK_FILTER) $(LOCK) > $(VENV)/requirements.txt
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(VENV)/requirements.txt
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

# One exact, hashed set of versions from pyproject's ranges (Python 3.11, x86-64 Linux).
lock:
	test -x .venv-lock/bin/uv || ($(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install -q uv==$(UV_VERSION))
	echo 'torch==$(TORCH_CPU)' > .venv-lock/torch.txt
	.venv-lock/bin/uv pip compile pyproject.toml --extra dev --generate-hashes --upgrade \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --find-links $(TORCH_WHEELS) --override .venv-lock/torch.txt \
	  --custom-compile-command 'make lock' -o $(LOCK)

# Rerunning continues (or re-reports) the same run; `rm -rf runs/tiny` starts over.
train: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m memlm.train --config configs/runs/tiny.yaml --resume $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "" $(PYTEST_ARGS)

# Wheels the GPU machines' image lacks or holds too old (Python 3.12, manylinux x86-64, the lock's versions,
# without their dependencies), carried in .whl/ for benchmarks/gpu_suite.sh.
# titans-pytorch (the kernel table's reference) and its dependencies are not in the lock: pinned here.
GPU_WHEELS = flash-linear-attention fla-core transformers huggingface-hub kernels omegaconf datasets dill multiprocess \
  titans-pytorch==0.5.5 assoc-scan==0.0.6 accelerated-scan==0.3.1 axial-positional-embedding==0.3.12 einx==0.4.3 \
  frozendict==2.5.1 hyper-connections==0.4.11 torch-einops-utils==0.2.0 rotary-embedding-torch==0.9.1 \
  tensordict==0.15.3 pyvers==0.2.3 x-transformers==2.31.10 loguru==0.7.3
gpu-wheels: $(STAMP)
	rm -rf .whl && mkdir -p .whl
	for pkg in $(GPU_WHEELS); do \
	  pin=$$(grep -m1 -i "^$$pkg==" requirements.lock | cut -d' ' -f1); \
	  $(BIN)/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d .whl "$${pin:-$$pkg}" || exit 1; \
	done
	du -sh .whl

# The lowest and the newest releases that pyproject allows of transformers, accelerate and datasets,
# each in a throwaway venv over the lock, running the model, generation, loading and training tests.
test-compat: $(STAMP)
	$(BIN)/python tools/compat.py

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/kernel_bench.py

clean:
	rm -rf $(VENV) .venv-lock .venv-compat-* runs .pytest_cache
