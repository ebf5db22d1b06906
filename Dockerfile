# syntax=docker/dockerfile:1
#
# The image every Ray node of a KubeRay cluster runs (head, workers, job submitter) and the
# MLflow tracking server of k8s/mlflow.yaml. Tag it with the Ray version (k8s/ keeps
# `rayVersion` equal to the tag):
#
#   CPU (head node, MLflow server, laptops):
#     docker build -t timematch:2.60.0 .
#   GPU workers: torch from a CUDA wheel index, e.g. PyPI's default CUDA build
#     docker build -t timematch:2.60.0-gpu --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
#   or one of PyTorch's CUDA indexes (pick one that has torch ${TORCH_VERSION} and suits the
#   nodes' driver): --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
#
# Only the files below are copied into the image (BuildKit sends nothing else, so a local
# .venv or mlflow.db never reaches the build).

ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}

# torch first and pinned: an unpinned resolve of the project pulls the newest CUDA build and
# gigabytes of nvidia wheels even for a CPU image.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Must equal `rayVersion` in k8s/raycluster.yaml and k8s/rayjob.yaml.
ARG RAY_VERSION=2.60.0
ARG PSYCOPG2_VERSION=2.9.13

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_AUTH_MODE=disabled \
    RAY_USAGE_STATS_ENABLED=0 \
    MLFLOW_DISABLE_TELEMETRY=true \
    TIMEMATCH_DATA=/data \
    TIMEMATCH_CACHE=/cache

# wget: KubeRay's liveness and readiness probes of Ray pods run `wget` against the raylet
# and the dashboard; python:3.11-slim does not ship it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The project's dependencies in their own layer, so that editing the code does not reinstall
# them. ray[default] brings the dashboard and job server (KubeRay's probes and RayJob
# submission need them), ray[client] the server behind ray://host:10001; psycopg2-binary is the
# PostgreSQL driver of the MLflow server in k8s/mlflow.yaml.
WORKDIR /app
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
        "ray[default,tune,client]==${RAY_VERSION}" \
        "psycopg2-binary==${PSYCOPG2_VERSION}" \
    && python -c "import torch, ray; assert ray.__version__ == '${RAY_VERSION}', ray.__version__; print('torch', torch.__version__, 'ray', ray.__version__)"

COPY README.md launch.py ./
COPY timematch/ timematch/
COPY experiments/ experiments/
COPY search_spaces/ search_spaces/
RUN pip install . \
    && python -c "import torch, ray; assert torch.__version__.startswith('${TORCH_VERSION}'), torch.__version__; assert ray.__version__ == '${RAY_VERSION}'"

# Run as an unprivileged user with uid 1000, like the rayproject/ray images. /app is the working
# directory of `ray start` under KubeRay, so a RayJob's `python launch.py ...` runs from here;
# the user owns the folder itself (not the code) to write results there.
RUN useradd --uid 1000 --create-home --shell /bin/bash ray \
    && mkdir -p /data /cache \
    && chown ray:ray /app /cache
USER ray

CMD ["python", "launch.py", "--help"]
