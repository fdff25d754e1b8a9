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

# The MLflow UI over the pipeline's default store (OUT/mlflow.db), on this machine only.
# One worker and no job runner: ~0.5 GiB and a few seconds to start (instead of ~3 GiB).
PORT ?= 5000
.PHONY: mlflow-ui
mlflow-ui: $(STAMP)
	@mkdir -p $(OUT)
	MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false exec $(PY) -m mlflow server --host 127.0.0.1 --port $(PORT) \
		--workers 1 --backend-store-uri sqlite:///$(abspath $(OUT))/mlflow.db \
		--artifacts-destination $(abspath $(OUT))/mlartifacts
