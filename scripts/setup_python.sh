#!/usr/bin/env bash
# Creates .venv with the reference implementation (PyTorch + transformers) used to write the parity
# fixtures and by the benchmark comparison. Tests do not need it: the fixtures are committed.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -r scripts/requirements.txt
.venv/bin/python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
