# `make test` and `make demo` work on a fresh clone with nothing but Python >= 3.11.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test lint demo venv clean bench gpu-check

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest

# ruff: pyflakes, pycodestyle at 120 columns, import order, bugbear, complexity <= 15, imports at the top
# ([tool.ruff] in pyproject.toml); lint-imports: the layering contracts ([tool.importlinter])
lint: $(STAMP)
	$(PY) -m ruff check .
	$(VENV)/bin/lint-imports

# the digits study (5.4 min with 2 threads, 8.3 with 1, on a 2-core CPU: README "Demo"; rerunning resumes) and its report
demo: $(STAMP)
	$(PY) -m landscape.cli study --preset digits --out reports/digits --quiet
	@echo "open reports/digits/report.html in a browser"

bench: $(STAMP)
	$(PY) -m pip install -e '.[bench]'
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_instruments.py

gpu-check: $(STAMP)
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
