# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# torch is pinned here (a local CPU build on our machines); the package itself asks for torch>=2.3.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_PIN := torch==2.13.0
STAMP := $(VENV)/.installed-dev

.PHONY: install demo test check lint bench figures clean

# The whole suite is bounded twice: pytest-timeout fails a single test after 300 s
# (pyproject.toml), and SUITE_LIMIT ends the run (and every process it started) if the suite
# as a whole hangs, so CI always finishes.
SUITE_LIMIT := 2700

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q $(TORCH_PIN) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m hessrank.demo

test: $(STAMP)
	$(VENV)/bin/ruff check hessrank tests experiments notebooks
	timeout -k 30 $(SUITE_LIMIT) $(PY) -m pytest -q -n 2 --durations=15 tests

# The fast subset (under 2 minutes on 2 cores): everything not marked slow.
check: $(STAMP)
	$(VENV)/bin/ruff check hessrank tests experiments notebooks
	timeout -k 30 $(SUITE_LIMIT) $(PY) -m pytest -q -n 2 -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check hessrank tests experiments notebooks

# Peers (pyhessian, curvlinops) get their own venv: curvlinops pulls torchvision, and with
# torchvision beside torch 2.13 transformers no longer imports, which `make test` needs.
# hessrank/ never imports the peers.
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/pip install -q --upgrade pip
	$(BENCH_VENV)/bin/pip install -q $(TORCH_PIN) -e ".[dev,bench]"
	touch $@

bench: $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python experiments/benchmarks/run_all.py

figures: $(STAMP)
	$(PY) experiments/figures/make_figures.py --out paper_figures

clean:
	rm -rf $(VENV) .pytest_cache
