#!/usr/bin/env bash
# Set up (idempotent), then: SmolLM2 GGUF -> bf16 checkpoint -> tpde repo -> load, generate, prove bit-exactness.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
python scripts/demo.py "$@"
echo
echo "Next: run '. .venv/bin/activate' (it puts tpde and this Python on your PATH), then README.md's Quickstart."
