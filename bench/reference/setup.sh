#!/usr/bin/env bash
# Installs the PyTorch reference into bench/reference/.venv — a benchmark-only dependency; tokenfold
# itself never needs Python. PyPI's Linux wheel of torch brings CUDA libraries along (a few GB); they
# are loaded lazily and unused here, since the comparison runs on the CPU.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python3 -m venv "$here/.venv"
"$here/.venv/bin/pip" install --quiet --upgrade pip
"$here/.venv/bin/pip" install --quiet -r "$here/requirements.txt"
"$here/.venv/bin/python" -c 'import torch; print("torch", torch.__version__, "ready in", "'"$here/.venv"'")'
