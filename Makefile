# Two commands set up everything on a fresh machine:
#   make demo   create .venv, install the package with what the demo needs, run it
#   make test   create .venv, install the test dependencies, run the suite; then
#               the framework tests (tests/models/) in .venv-vision
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The pinned CPU wheel first: an unpinned torch would pull several GB of CUDA
# packages on a bare machine; with 2.13.0 present, torch>=2.3 is satisfied.
TORCH  ?= torch==2.13.0
# The framework tests (tests/models/: timm, HF Trainer) also run in a second env.
# timm imports torchvision, and a torchvision wheel imports only beside the torch
# build it was made for: PyPI's 0.28.0 (for torch 2.13) is built against the CUDA
# torch and fails beside the CPU wheel ("operator torchvision::nms does not
# exist"), and transformers then fails too, as it imports torchvision when present.
# So .venv keeps no torchvision (it gets transformers and accelerate: the `hf`
# extra), and .venv-vision takes a matching CUDA pair, which runs on the CPU.
# See docs/frameworks.md#installing.
VISION       ?= .venv-vision
VPY          := $(VISION)/bin/python
VISION_TORCH ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test test-models docs readme bench clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	touch $@

$(VENV)/.bench: $(VENV)/.base pyproject.toml
	$(PIP) install -q -e ".[bench]"
	touch $@

$(VENV)/.test: $(VENV)/.base pyproject.toml
	$(PIP) install -q -e ".[test,bench,docs,hf]"
	# curvlinops declares backpack-for-pytorch, which pulls torchvision and a
	# multi-GB torch; its K-FAC operators need neither, so install it without
	# dependencies and add the few it imports by hand.
	$(PIP) install -q --no-deps curvlinops-for-pytorch linear_operator
	$(PIP) install -q einconv opt-einsum scipy tqdm
	touch $@

$(VISION)/.test: pyproject.toml
	$(PYTHON) -m venv $(VISION)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(VISION_TORCH)
	$(VPY) -m pip install -q -e ".[test,models]"
	touch $@

# kfac-pytorch (an anchor of benchmarks/speed.py) is not on the package index: its source archive
# lies in ../shared/anchors; it goes into this benchmark environment only, without dependencies.
ANCHORS ?= ../shared/anchors/kfac-pytorch-src.tar.gz
$(VENV)/.anchors: $(VENV)/.bench
	@if [ -f $(ANCHORS) ]; then $(PIP) install -q --no-deps $(ANCHORS); \
	else echo "note: $(ANCHORS) not found: benchmarks/speed.py skips its kfac-pytorch rows" >&2; fi
	touch $@

# The speed table against kfac-pytorch and singd (docs/speed.md).
bench: $(VENV)/.anchors
	$(PY) benchmarks/speed.py

$(VENV)/.docs: $(VENV)/.base pyproject.toml
	$(PIP) install -q -e ".[docs]"
	touch $@

demo: $(VENV)/.bench
	$(VENV)/bin/singd-rkfac demo

# SINGD_RKFAC_REQUIRE: frameworks whose tests must run here (missing = failure, not a skip).
test: $(VENV)/.test
	SINGD_RKFAC_REQUIRE=transformers,accelerate $(PY) -m pytest -x -q
	@$(MAKE) --no-print-directory test-models

# tests/models/ in $(VISION). When the env cannot be built: an error under CI=true,
# a skip with the reason otherwise.
test-models:
	@if $(MAKE) --no-print-directory $(VISION)/.test; then \
	  echo "SINGD_RKFAC_REQUIRE=transformers,accelerate,timm,torchvision $(VPY) -m pytest -x -q tests/models"; \
	  SINGD_RKFAC_REQUIRE=transformers,accelerate,timm,torchvision $(VPY) -m pytest -x -q tests/models; \
	elif [ "$$CI" = true ]; then \
	  echo "error: could not build $(VISION) ($(VISION_TORCH), .[test,models]): the framework tests did not run" >&2; \
	  exit 1; \
	else \
	  echo "SKIPPED tests/models in $(VISION): it could not be built (pip's error is above); under CI=true this is an error" >&2; \
	fi

docs: $(VENV)/.docs
	$(VENV)/bin/mkdocs build --strict

# The README's time-to-target table from benchmarks/results/train.json (--check: fail when stale).
readme: $(VENV)/.bench
	$(PY) benchmarks/_readme.py

clean:
	rm -rf $(VENV) $(VISION) site build *.egg-info
