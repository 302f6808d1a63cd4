# The README's commands. Each creates .venv if missing and installs everything pinned:
# torch==2.13.0 first (the CPU wheel), then the rest under constraints.txt so nothing swaps torch.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.normlab-installed

.PHONY: install test study bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --disable-pip-version-check torch==2.13.0
	$(PIP) install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -n 2 -q tests

study: $(STAMP)
	$(VENV)/bin/normlab study
	@echo "report: $(CURDIR)/runs/default/report.md (plots beside it; re-run to resume, delete runs/default to start over)"

bench: $(STAMP)
	$(VENV)/bin/normlab bench --quick

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
