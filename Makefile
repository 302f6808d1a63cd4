# The README's commands. Each creates .venv if missing and installs everything pinned:
# torch==2.13.0 first (the CPU wheel), then the rest under constraints.txt so nothing swaps torch, and
# normlab itself with --no-build-isolation: its C++ extension builds against that torch.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.normlab-installed

NATIVE := setup.py $(wildcard normlab/kernels/cpu/csrc/*)
SANITIZED := build/sanitize

.PHONY: install test test-sanitize study bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt $(NATIVE)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -c constraints.txt setuptools wheel
	$(PIP) install -q --disable-pip-version-check --no-build-isolation -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check normlab tests setup.py
	$(PY) -m pytest -n 2 -q tests

# The kernel tests against a build with AddressSanitizer and UndefinedBehaviorSanitizer.
test-sanitize: $(STAMP)
	NORMLAB_SANITIZE=1 $(PY) setup.py -q build_ext --build-lib $(SANITIZED)/lib --build-temp $(SANITIZED)/tmp
	NORMLAB_CPU_EXTENSION="$$(ls $(CURDIR)/$(SANITIZED)/lib/normlab/kernels/cpu/_C*.so)" \
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	$(PY) -m pytest -q -p no:randomly tests/kernels/test_cpu_kernels.py tests/kernels/test_cpu_gated_rms_norm.py \
		tests/kernels/test_cpu_fronts.py tests/ops/test_fronts.py tests/ops/test_rms_norm.py tests/ops/test_layer_norm.py \
		tests/ops/test_dyt.py tests/ops/test_gated_rms_norm.py

study: $(STAMP)
	$(VENV)/bin/normlab study
	@echo "report: $(CURDIR)/runs/default/report.md (plots beside it; re-run to resume, delete runs/default to start over)"

bench: $(STAMP)
	$(VENV)/bin/normlab bench --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis normlab/kernels/cpu/_C*.so
