# Two commands do all the set-up on a fresh machine:
#   make test   the full test suite (Triton kernels through the interpreter on the CPU)
#   make demo   the end-to-end example on the bundled data
# Each creates .venv if it is missing and installs metamoe with its test extras (which builds the
# C++/CUDA extension); both are quick when everything is already in place.
# `make test` runs ruff (configured in pyproject.toml) before the tests.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.metamoe-installed
# Rebuild/reinstall when the build inputs change.
BUILD_INPUTS := setup.py pyproject.toml CMakeLists.txt $(shell find csrc -type f 2>/dev/null) metamoe/version.py

PYTEST_ARGS ?= -q
DEMO_OUT ?= demo_out
SEED ?= 0

.PHONY: test lint demo install ext bench bench-quick compile-report gpu-check clean info mutate

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
	$(VENV)/bin/ruff check .
	TRITON_INTERPRET=1 $(VENV)/bin/pytest $(PYTEST_ARGS) tests

# make mutate: mutation testing (mutmut, configured in pyproject.toml) of the integrity, loss and selection
# modules against their tests; not part of `make test`. MUTANTS="metamoe.moe.losses*" runs a subset; the
# survivors: .venv/bin/mutmut results, one shown with .venv/bin/mutmut show NAME.
MUTATE_JOBS ?= 2
mutate: $(STAMP)
	$(PY) -m pip install --quiet 'mutmut>=3.3'
	TRITON_INTERPRET=1 $(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS) $(MUTANTS)
	$(VENV)/bin/mutmut results

lint: $(STAMP)
	$(VENV)/bin/ruff check .

demo: $(STAMP)
	$(VENV)/bin/metamoe demo --out $(DEMO_OUT) --seed $(SEED)

info: $(STAMP)
	$(VENV)/bin/metamoe info

bench: $(STAMP)
	$(VENV)/bin/metamoe bench $(BENCH_ARGS)

# make bench-quick BENCH_JSON=path: the CPU half of the pytest-benchmark suite (benchmarks/suite: every op at
# the quick shapes of benchmarks/cases.py against its peers, each result checked; a few minutes at most on 2
# cores), pytest-benchmark's JSON written to BENCH_JSON and the run autosaved under .benchmarks/. Compare
# with the previous saved run (e.g. from another commit):
#   .venv/bin/pytest benchmarks/suite -m "not gpu" --benchmark-only --benchmark-compare [--benchmark-compare-fail=median:20%]
# or two saved runs: .venv/bin/pytest-benchmark compare 0001 0002. The GPU half: pytest benchmarks/suite -m gpu --benchmark-only.
BENCH_JSON ?= .benchmarks/bench-quick.json
bench-quick: $(STAMP)
	@mkdir -p $(dir $(BENCH_JSON))
	$(VENV)/bin/pytest benchmarks/suite -m "not gpu" --benchmark-only --benchmark-autosave \
		--benchmark-json=$(BENCH_JSON) -p no:cacheprovider $(PYTEST_ARGS)

# Compile every Triton kernel x autotune config x dtype (and the CUDA sources) ahead of time for sm_90a on
# the CPU, no GPU needed; writes benchmarks/results/compile_report_sm90.csv (registers, spills, shared memory,
# pruned configs). Never under TRITON_INTERPRET. COMPILE_REPORT_ARGS: e.g. --subset ci, --kernels scatter.
compile-report: $(STAMP)
	$(VENV)/bin/python benchmarks/compile_report.py $(COMPILE_REPORT_ARGS)

# make gpu-check OUT=DIR, on a machine with a CUDA device and no network: installs offline
# (pip install --no-build-isolation --no-deps -e .), runs the gpu tests and every autotune config of every
# kernel with compiled kernels, then the benchmarks at the issue target shapes against their peers; writes
# summary.md, gpu_check.log and the benchmark CSVs (at most 8 files) into DIR. Uses $(PYTHON), the
# interpreter that has torch there (PYTHON=.venv/bin/python for a venv). Without a CUDA device: exit 2.
OUT ?= gpu_check_out
gpu-check:
	@$(PYTHON) benchmarks/gpu_check.py --out $(OUT) $(GPU_CHECK_ARGS)

clean:
	rm -rf build $(VENV) metamoe/_C*.so metamoe/_build_info.json *.egg-info
