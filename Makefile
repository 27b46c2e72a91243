# memlm: `make train` (embedded default pretraining on CPU) and `make test`.
# The virtual environment is created on first use. On a machine without a CUDA driver the
# install is pinned by constraints-cpu.txt (CPU torch, no multi-GB CUDA wheels); with a
# driver, the venv sees the system's own torch (--system-site-packages) and keeps it.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_CUDA),1)
VENV_FLAGS  := --system-site-packages
CONSTRAINTS :=
else
VENV_FLAGS  :=
CONSTRAINTS := -c constraints-cpu.txt
endif
PYTEST_ARGS ?=
ARGS ?=

.PHONY: venv train test test-slow test-gpu test-all lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(BIN)/python -m pip install -q $(CONSTRAINTS) -e '.[dev]'
	touch $(STAMP)

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

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python benchmarks/kernels.py

clean:
	rm -rf $(VENV) runs .pytest_cache
