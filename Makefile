# Two commands do everything on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# One Snakemake core per CPU core: more cores than the machine has oversubscribe the torch jobs.
CORES ?= $(shell nproc 2>/dev/null || echo 2)
# Where the default config (config.yaml) writes; each shipped config has a results folder of its own.
RESULTS ?= results/default
# The torch wheel installed before the project on machines without an NVIDIA driver. On a machine of
# this project's kind it is a local CPU build; elsewhere add TORCH_INDEX=https://download.pytorch.org/whl/cpu.
TORCH_CPU ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: setup run test lint bench clean-results

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "NVIDIA driver found: pip chooses a CUDA build of torch"; \
	elif $(BIN)/python -c "import torch" >/dev/null 2>&1; then \
	  echo "torch already installed: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	else \
	  echo "no NVIDIA driver: installing the CPU build $(TORCH_CPU)"; \
	  $(BIN)/python -m pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_CPU)"; \
	fi
	$(BIN)/python -m pip install -q -e ".[dev,universal]"
	@# the CGCNN edge kernels, compiled once per machine (without a C compiler the PyTorch path runs instead)
	$(BIN)/python -c "from crystal_transfer.kernels import native as n; n.kernels(); print(n.describe())"
	touch $@

# The rules call `python -m crystal_transfer`: the venv's bin comes first on PATH.
run: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES) all
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --cores $(CORES) --report $(RESULTS)/report.html

test: setup
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest

lint: setup
	$(BIN)/ruff check src tests benchmarks
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/snakemake --lint

bench: setup
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/graphs.py
	$(BIN)/python benchmarks/train.py
	$(BIN)/python benchmarks/transfer.py
	$(BIN)/python benchmarks/features.py
	$(BIN)/python benchmarks/scale.py --sizes 1,3
