# prefix-serve API service.
#   CPU (default):  docker build -f docker/service.Dockerfile -t prefix-serve/service .
#   CUDA:           docker build -f docker/service.Dockerfile \
#                     --build-arg BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime -t prefix-serve/service:cuda .
# A base image that already has torch keeps it; otherwise the CPU wheel is installed.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1

WORKDIR /app
RUN python -c "import torch" 2>/dev/null \
    || pip install "${TORCH_SPEC}" --index-url "${TORCH_INDEX_URL}"
# The exact locked set (hash-checked, no resolution), then the project itself; `pip check` proves the set consistent
# with whichever torch the image has.
COPY requirements/requirements-runtime.txt ./requirements/
RUN pip install --no-deps --require-hashes -r requirements/requirements-runtime.txt
COPY pyproject.toml README.md ./
COPY prefix_store ./prefix_store
COPY service ./service
COPY trainer ./trainer
RUN pip install --no-deps --no-build-isolation . && pip check

RUN useradd --create-home --uid 10001 app && mkdir -p /data && chown app /data
USER app
ENV PREFIXSERVE_DATA_DIR=/data
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=5 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=3)"
# Binding 0.0.0.0 requires PREFIXSERVE_API_KEYS / PREFIXSERVE_ADMIN_KEYS: the service refuses to run open off loopback.
CMD ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
