# prefix-serve trainer worker: consumes training jobs from Redis and publishes prefixes.
#   CPU (default):  docker build -f docker/trainer.Dockerfile -t prefix-serve/trainer .
#   CUDA:           docker build -f docker/trainer.Dockerfile \
#                     --build-arg BASE_IMAGE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime -t prefix-serve/trainer:cuda .
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

RUN useradd --create-home --uid 10001 app && mkdir -p /work/checkpoints && chown -R app /work
USER app
WORKDIR /work
CMD ["python", "-m", "trainer", "worker"]
