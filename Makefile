# The whole set-up is `make demo` / `make test`: each creates .venv and installs what it needs from PyPI.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vtprune-installed

.PHONY: demo test bench clean cuda-build

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=68" wheel
	$(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,eval]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vtprune demo

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: $(STAMP)
	$(PY) eval/bench/prefill.py --threads 1 --repeats 15 --out eval/results/prefill.md

clean:
	rm -rf $(VENV) build *.egg-info

# Compile (JIT, cached) the CUDA kernels of csrc/cuda with nvcc and check they load (minutes; no GPU needed).
CUDA_HOME ?= /usr/local/cuda
cuda-build: $(STAMP)
	CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-9.0} VTPRUNE_CUDA=1 $(PY) -c \
	  "import vtprune.kernels as K; s = K.available(); print(s); assert s['cuda'], 'CUDA kernels did not build'"
