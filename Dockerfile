# syntax=docker/dockerfile:1
#
# zipper-asr for a GPU node: our service and the regular (CUDA) vLLM package in one image, the vLLM
# backend by default. docs/deploy.md walks through it; the targets and build arguments:
#
#   docker build -t zipper-asr:0.1.0 .                          # runtime: the model is mounted at /models
#   docker build --target baked -t zipper-asr:0.1.0-baked .     # + models/default baked in at /models/default
#   docker compose -f docker-compose.yml -f docker-compose.cpu.yml build   # CPU: CPU torch, no vLLM (see there)
#
# Versions are pinned: the base and uv images by tag, Python by the uv release, and every Python package by
# deploy/docker/requirements-gpu.txt (a uv lock of pyproject.toml + the vllm extra; update-lock.sh beside it).

ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------------------------------------------------
# build: Python, the locked dependencies in /opt/venv, and our wheel. Nothing of it but /opt is kept.
FROM ${CUDA_IMAGE} AS build
ARG PYTHON_VERSION=3.11
# Empty: PyPI's torch, a CUDA 13 build (what vLLM is built against). The CPU overlay passes PyTorch's CPU index.
ARG TORCH_INDEX=
# The extra installed beside the base dependencies: vllm (GPU) or nothing (CPU overlay: embedded engine only).
ARG ZASR_EXTRAS=vllm
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    VIRTUAL_ENV=/opt/venv
COPY --from=uv /uv /usr/local/bin/uv
# A standalone CPython (python-build-standalone, the release uv pins): Ubuntu 24.04 ships only 3.12, and the
# project needs 3.11. It carries its C headers, which Triton needs at run time (see the runtime stage).
RUN uv python install "${PYTHON_VERSION}" && uv venv --python "${PYTHON_VERSION}" /opt/venv

# Dependencies first, in their own layer: it changes only with pyproject.toml or the lock, not with our code.
# The lock holds torch==2.13.0 (pyproject's pin) and vllm==0.30.0, which pins that very torch; constraining the
# resolution with it installs exactly the locked set. A CPU build installs PyTorch's CPU wheel first
# (2.13.0+cpu satisfies ==2.13.0), so the CUDA packages are never needed.
WORKDIR /src
COPY pyproject.toml ./
COPY deploy/docker/requirements-gpu.txt deploy/docker/requirements-gpu.txt
RUN --mount=type=cache,target=/root/.cache/uv \
    if [ -n "${TORCH_INDEX}" ]; then uv pip install --index-url "${TORCH_INDEX}" "torch==2.13.0"; fi \
    && uv pip install -r pyproject.toml ${ZASR_EXTRAS:+--extra "${ZASR_EXTRAS}"} \
        --constraint deploy/docker/requirements-gpu.txt

# Our code as a wheel (a small layer of its own in the runtime stage).
COPY README.md ./
COPY speechllm speechllm
COPY adapters adapters
COPY server server
RUN --mount=type=cache,target=/root/.cache/uv uv build --wheel --out-dir /dist .

# ---------------------------------------------------------------------------------------------------------
# model-files: the shipped model, readable by the service's user whatever the checkout's file modes were.
FROM ${CUDA_IMAGE} AS model-files
COPY models/default /model
RUN chmod -R a+rX /model

# ---------------------------------------------------------------------------------------------------------
# runtime: what runs. The model is mounted at /models (docker-compose.yml does it), or baked by `--target baked`.
FROM ${CUDA_IMAGE} AS runtime
# gcc and the C library headers: vLLM's Triton kernels (its LoRA kernels among them) compile a small C launcher
# on first use and fail with "Failed to find C compiler" without them. The CPU overlay passes an empty list.
ARG RUNTIME_APT_PACKAGES="gcc libc6-dev"
# The engine backend the image starts with (ZASR_BACKEND at run time overrides it): vllm here, embedded on CPU.
ARG ZASR_BACKEND=vllm
# Ubuntu package versions follow the pinned base image's release; exact pins would break at its next security
# update (Ubuntu keeps only the newest build in its archive), hence no version pins here.
# hadolint ignore=DL3008
RUN if [ -n "${RUNTIME_APT_PACKAGES}" ]; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${RUNTIME_APT_PACKAGES} \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin zasr \
    && mkdir -p /home/zasr/.cache /srv/zasr \
    && chown zasr:zasr /home/zasr/.cache

COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
# Our wheel into the venv: the only layer that changes with a code change (≈1 MB).
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    --mount=type=bind,from=uv,source=/uv,target=/usr/local/bin/uv \
    VIRTUAL_ENV=/opt/venv uv pip install --no-deps --no-cache --compile-bytecode /dist/zipper_asr-*.whl
COPY deploy/docker/healthcheck.py /usr/local/bin/zasr-healthcheck

# ZASR_* are the service's settings (server/settings.py); the ones here are what a container needs.
# HF_HUB_OFFLINE: nothing is ever fetched from a model hub at run time. Caches (vLLM's torch.compile, Triton,
# FlashInfer) live under ~/.cache, a volume in docker-compose.yml so that restarts skip the compilation.
ENV PATH=/opt/venv/bin:${PATH} \
    VIRTUAL_ENV=/opt/venv \
    PYTHONUNBUFFERED=1 \
    HOME=/home/zasr \
    TRITON_CACHE_DIR=/home/zasr/.cache/triton \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    ZASR_HOST=0.0.0.0 \
    ZASR_PORT=8000 \
    ZASR_MODEL_DIR=/models/default \
    ZASR_BACKEND=${ZASR_BACKEND} \
    ZASR_VLLM_DTYPE=bfloat16 \
    ZASR_VLLM_GPU_MEMORY_UTILIZATION=0.85

LABEL org.opencontainers.image.title="zipper-asr" \
      org.opencontainers.image.description="OpenAI-compatible multilingual speech recognition (Speech-LLM + Zipper-LoRA)" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="Apache-2.0"

# Numeric, so that Kubernetes' runAsNonRoot can verify it (the user zasr, created above).
USER 10001:10001
# An empty working directory: the service reads an optional .env file from it.
WORKDIR /srv/zasr
EXPOSE 8000
# /ready answers 503 until the model is loaded; a large LLM in vLLM (weights, CUDA graphs, torch.compile) can
# take minutes on its first start, hence the long start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "/usr/local/bin/zasr-healthcheck"]
CMD ["zipper-asr", "serve"]

# ---------------------------------------------------------------------------------------------------------
# baked: runtime + the shipped model at /models/default (a volume mounted at /models replaces it).
FROM runtime AS baked
COPY --from=model-files /model /models/default

# The default target (the last stage would be `baked`): the runtime image, model mounted.
FROM runtime AS default
