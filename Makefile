# Two commands do all the set-up on a fresh machine:
#   make test   the full test suite (Triton kernels through the interpreter on the CPU)
#   make demo   the end-to-end example on the bundled data
# Each creates .venv if it is missing and installs metamoe with its test extras (which builds the
# C++/CUDA extension); both are quick when everything is already in place.
# The console scripts (.venv/bin/pytest, .venv/bin/metamoe) are used rather than `python -m ...`, which puts the
# current folder first on sys.path: there the repo's top-level kernels/ folder (installed as metamoe.kernels)
# would shadow the PyPI package `kernels` that transformers >= 5.25 imports when it builds a model.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.metamoe-installed
# Rebuild/reinstall when the build inputs change.
BUILD_INPUTS := setup.py pyproject.toml CMakeLists.txt $(shell find csrc -type f 2>/dev/null) metamoe/version.py

PYTEST_ARGS ?= -q
DEMO_OUT ?= demo_out
SEED ?= 0

.PHONY: test demo install ext bench clean info

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) $(BUILD_INPUTS)
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

install: $(STAMP)

# Rebuild only the extension, in place, after editing csrc/ (no reinstall, no dependency check).
ext: $(PY)
	$(PY) setup.py -q build_ext --inplace

test: $(STAMP)
	TRITON_INTERPRET=1 $(VENV)/bin/pytest $(PYTEST_ARGS) tests

demo: $(STAMP)
	$(VENV)/bin/metamoe demo --out $(DEMO_OUT) --seed $(SEED)

info: $(STAMP)
	$(VENV)/bin/metamoe info

bench: $(STAMP)
	$(VENV)/bin/metamoe bench $(BENCH_ARGS)

clean:
	rm -rf build $(VENV) metamoe/_C*.so metamoe/_build_info.json *.egg-info
