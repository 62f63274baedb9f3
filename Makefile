# Two commands set up everything on a fresh machine:
#   make demo   create .venv, install the package with what the demo needs, run it
#   make test   create .venv, install the test dependencies, run the suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The pinned CPU wheel first: an unpinned torch would pull several GB of CUDA
# packages on a bare machine; with 2.13.0 present, torch>=2.3 is satisfied.
TORCH  ?= torch==2.13.0

.PHONY: demo test docs readme bench clean

$(VENV)/.base:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	touch $@

$(VENV)/.bench: $(VENV)/.base pyproject.toml
	$(PIP) install -q -e ".[bench]"
	touch $@

$(VENV)/.test: $(VENV)/.base pyproject.toml
	$(PIP) install -q -e ".[test,bench,docs]"
	# curvlinops declares backpack-for-pytorch, which pulls torchvision and a
	# multi-GB torch; its K-FAC operators need neither, so install it without
	# dependencies and add the few it imports by hand.
	$(PIP) install -q --no-deps curvlinops-for-pytorch linear_operator
	$(PIP) install -q einconv opt-einsum scipy tqdm
	touch $@

$(VENV)/.docs: $(VENV)/.base pyproject.toml
	$(PIP) install -q -e ".[docs]"
	touch $@

demo: $(VENV)/.bench
	$(VENV)/bin/singd-rkfac demo

test: $(VENV)/.test
	$(PY) -m pytest -x -q

docs: $(VENV)/.docs
	$(VENV)/bin/mkdocs build --strict

# The README's time-to-target table from benchmarks/results/train.json (--check: fail when stale).
readme: $(VENV)/.bench
	$(PY) benchmarks/_readme.py

clean:
	rm -rf $(VENV) site build *.egg-info
