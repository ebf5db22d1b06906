# syntax=docker/dockerfile:1
#
# The image every pod of k8s/ runs: the Ray nodes of the RayJob (head, workers, job
# submitter), the MLflow tracking server, the runner-user and dataset Jobs. Tag it with the Ray
# version (k8s/ keeps `rayVersion` equal to the tag); build for the cluster's architecture:
#
#   CPU (head node, MLflow server, laptops):
#     docker build --platform linux/amd64 -t timematch:2.60.0 .
#   GPU workers: torch from a CUDA wheel index, e.g. PyPI's default CUDA build
#     docker build --platform linux/amd64 -t timematch:2.60.0-gpu --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
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
# Must equal `rayVersion` in k8s/rayjob/rayjob.yaml and the ray[tune] pin of pyproject.toml.
ARG RAY_VERSION=2.60.0
# More options for every pip install of the build, e.g. a build without an index: "--no-index
# --find-links /wheels" with a wheelhouse mounted there (k8s/build-local.sh does so with podman).
ARG PIP_INSTALL_OPTIONS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    MLFLOW_DISABLE_TELEMETRY=true \
    TIMEMATCH_CACHE=/cache \
    TIMEMATCH_RESULTS=/cache/results

# No TIMEMATCH_DATA: without it a launch uses the embedded synthetic data, generated into
# $TIMEMATCH_CACHE (k8s/overlays/cpu-small); the gpu overlay sets it to its dataset volume.
# (Set here to /data, an empty folder of the image, it sent cpu-small's job to a dataset with
# no tiles; tests/test_image.py found it.)

# wget: the dataset Job downloads with `wget -c` (k8s/dataset); python:3.11-slim does not ship
# it. (KubeRay's probes of Ray pods ran wget before Ray 2.53; now they are HTTP probes.)
RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/*

RUN pip install ${PIP_INSTALL_OPTIONS} --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# The project's dependencies in their own layer, so that editing the code does not reinstall
# them. ray[default] brings the dashboard and job server (KubeRay's probes and RayJob
# submission need them), ray[client] the server behind ray://host:10001; the [server] extra
# is MLflow's basic-auth app and psycopg2, the PostgreSQL driver of the MLflow server.
WORKDIR /app
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['server']))" \
        > /tmp/requirements.txt \
    && pip install ${PIP_INSTALL_OPTIONS} -r /tmp/requirements.txt \
        "ray[default,tune,client]==${RAY_VERSION}" \
    && python -c "import torch, ray; assert ray.__version__ == '${RAY_VERSION}', ray.__version__; print('torch', torch.__version__, 'ray', ray.__version__)"

COPY README.md launch.py ./
COPY timematch/ timematch/
COPY experiments/ experiments/
COPY search_spaces/ search_spaces/
RUN pip install ${PIP_INSTALL_OPTIONS} ".[server]" \
    && python -c "import torch, ray; assert torch.__version__.startswith('${TORCH_VERSION}'), torch.__version__; assert ray.__version__ == '${RAY_VERSION}'"

# Run as an unprivileged user with uid 1000, like the rayproject/ray images; numeric, so that
# Kubernetes can check runAsNonRoot. /app is the working directory of `ray start` under
# KubeRay, so a RayJob's `python launch.py ...` runs from here. The pods of k8s/ mount the
# root filesystem read-only: results go to $TIMEMATCH_RESULTS on the shared cache volume.
RUN useradd --uid 1000 --create-home --shell /bin/bash ray \
    && mkdir -p /data /cache \
    && chown ray:ray /app /cache
USER 1000:1000

CMD ["python", "launch.py", "--help"]
