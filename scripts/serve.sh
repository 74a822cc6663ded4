#!/usr/bin/env bash
# The one command that sets everything up and runs the service on the shipped model (embedded engine).
# Settings come from ZASR_* environment variables (server/settings.py); extra arguments go to `serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/zipper-asr serve "$@"
