#!/usr/bin/env bash
# Regenerates deploy/docker/requirements-gpu.txt, the exact versions of every package the GPU image installs
# (Linux x86_64, CPython 3.11): pyproject.toml's dependencies and its `vllm` extra, constrained by lock.in.
# Run it after changing pyproject.toml's dependencies or lock.in; tests/test_deploy.py fails until then.
# It needs PyPI (metadata only: a few seconds) and nothing else; uv is installed into a throwaway venv.
set -euo pipefail
cd "$(dirname "$0")/../.."
UV_VERSION=0.13.9  # keep equal to the Dockerfile's UV_IMAGE tag (tests/test_deploy.py checks it)
tool="$(mktemp -d)"
trap 'rm -rf "$tool"' EXIT
python3 -m venv "$tool"
"$tool/bin/pip" install --quiet --disable-pip-version-check "uv==$UV_VERSION"
"$tool/bin/uv" pip compile pyproject.toml --extra vllm --constraint deploy/docker/lock.in \
  --quiet --python-version 3.11 --python-platform x86_64-manylinux_2_28 --annotation-style line \
  --custom-compile-command "bash deploy/docker/update-lock.sh" --output-file deploy/docker/requirements-gpu.txt
