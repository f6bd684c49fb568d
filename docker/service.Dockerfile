# prefix-serve API service. docker/build-base.sh builds it (and a Debian base where no registry is reachable):
#   CPU (default):  docker build -f docker/service.Dockerfile -t prefix-serve/service .
#   CUDA:           docker build -f docker/service.Dockerfile \
#                     --build-arg BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime -t prefix-serve/service:cuda .
# A base image that already has torch keeps it; otherwise the CPU wheel is installed (from docker/wheels/ when
# build-base.sh put it there, else from TORCH_INDEX_URL).
# Stages: the builder installs the dependencies into /opt/venv and the project into /opt/app; the runtime stage is
# the base image plus those two, so no pip, pip cache, wheel, compiler or source tree reaches it. Every stage but the
# last is the same text in docker/trainer.Dockerfile, so the second image reuses their layers.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE} AS builder

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Optional package indexes for pip (a mirror); unset: pip's default, PyPI.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# venv needs ensurepip, which Debian splits off into python3-venv (python:3.11-slim and conda bases have it).
# --system-site-packages: a CUDA base image's torch stays visible in the venv.
RUN python -c "import ensurepip" 2>/dev/null \
    || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
         python3-venv >/dev/null; } \
    && python -m venv --system-site-packages /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# The host's CA bundle (docker/certs/, written by build-base.sh) for pip, should the indexes sit behind a proxy.
COPY docker/certs /tmp/certs
COPY docker/wheels /tmp/wheels
RUN [ ! -s /tmp/certs/ca-bundle.crt ] || export PIP_CERT=/tmp/certs/ca-bundle.crt; \
    python -c "import torch" 2>/dev/null \
    || pip install --no-deps --no-index --find-links /tmp/wheels "${TORCH_SPEC}" \
    || pip install "${TORCH_SPEC}" --index-url "${TORCH_INDEX_URL}"
# The exact locked set (hash-checked, no resolution).
WORKDIR /src
COPY requirements/requirements-runtime.txt ./requirements/
RUN [ ! -s /tmp/certs/ca-bundle.crt ] || export PIP_CERT=/tmp/certs/ca-bundle.crt; \
    pip install --no-deps --require-hashes -r requirements/requirements-runtime.txt
# What the lock leaves out on Python < 3.11.3 (Debian bookworm's 3.11.2): see the file.
COPY docker/requirements-python-lt-3.11.3.txt ./requirements/
RUN [ ! -s /tmp/certs/ca-bundle.crt ] || export PIP_CERT=/tmp/certs/ca-bundle.crt; \
    pip install --no-deps --require-hashes -r requirements/requirements-python-lt-3.11.3.txt

# The dependencies as the runtime stage copies them: without pip, since nothing installs at run time. This layer
# changes only with the lock.
FROM builder AS runtime-deps
RUN pip uninstall -y -q pip

# The project itself, into /opt/app apart from its dependencies, so that a code change rebuilds a small layer;
# `pip check` proves the whole set consistent with whichever torch the image has.
FROM builder AS project
COPY pyproject.toml README.md ./
COPY prefix_store ./prefix_store
COPY service ./service
COPY trainer ./trainer
RUN pip install --no-deps --no-build-isolation . --target /opt/app && PYTHONPATH=/opt/app pip check

FROM ${BASE_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/app/bin:/opt/venv/bin:$PATH PYTHONPATH=/opt/app
COPY --from=runtime-deps /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 app && mkdir -p /data && chown app /data
COPY --from=project /opt/app /opt/app
USER app
WORKDIR /home/app
ENV PREFIXSERVE_DATA_DIR=/data
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=5 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=3)"
# Binding 0.0.0.0 requires PREFIXSERVE_API_KEYS / PREFIXSERVE_ADMIN_KEYS: the service refuses to run open off loopback.
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
