#!/usr/bin/env bash
# Set up a development environment from scratch in ./.venv (idempotent).
#
#   scripts/bootstrap.sh            # core + engine + Triton + CuTe DSL kernels + dev tools
#
# On a CPU-only machine torch must be pinned first: an unpinned torch pulls a ~5 GB CUDA build.
# TOKENSPEED_TORCH overrides the torch requirement (e.g. "torch" on a GPU machine that has one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --disable-pip-version-check --upgrade pip
pip install -q --disable-pip-version-check "${TOKENSPEED_TORCH:-torch==2.13.0}"
pip install -q --disable-pip-version-check "setuptools>=77" wheel "cffi>=1.16"
# Our three distributions, editable, with their real dependencies and the dev tools.
pip install -q --disable-pip-version-check --no-build-isolation \
    -e ".[dev]" -e ./tokenspeed_kernels_triton -e ./tokenspeed_kernels_blackwell
echo "bootstrap: ready ($(.venv/bin/python -c 'import torch, tokenspeed; print("torch", torch.__version__)'))"
