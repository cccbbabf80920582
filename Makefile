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

# the whole suite. tests/test_readme.py (every README block, the digits demo study included: about half the suite's
# time, one test) runs beside the rest, each with one thread, so that a 2-core machine is busy without asking for
# more threads than it has; its report follows the rest's, and the target fails if either part fails
TEST_ENV := OMP_NUM_THREADS=1 DNQ_TEST_THREADS=1

test: $(STAMP)
	@rm -f .pytest-readme.log
	@$(TEST_ENV) $(PY) -m pytest -p no:cacheprovider tests/test_readme.py >.pytest-readme.log 2>&1 & readme=$$!; \
	$(TEST_ENV) $(PY) -m pytest --ignore=tests/test_readme.py; rest=$$?; \
	wait $$readme; code=$$?; echo "--- tests/test_readme.py (ran beside the rest)"; cat .pytest-readme.log; \
	test $$rest -eq 0 -a $$code -eq 0

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
