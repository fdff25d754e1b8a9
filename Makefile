# Every target installs what it needs into .venv/ first (one pip install, re-run only when
# pyproject.toml or constraints.txt change).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DATA   ?= data/benchmark
OUT    ?= outputs

.PHONY: install test test-slow demo bench benchmark-data preview clean

$(STAMP): pyproject.toml constraints.txt
	@echo ">> installing into $(VENV)/ (torch CPU, Ray, MLflow, ...; ~2 min on a fresh machine)"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -qq --upgrade pip
	@$(PY) -m pip install -qq -c constraints.txt -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

benchmark-data: $(STAMP)
	$(PY) jobs/make_benchmark.py --out $(DATA)

bench: $(STAMP)
	$(PY) benchmarks/bench_selectors.py

clean:
	rm -rf $(OUT) .pytest_cache
