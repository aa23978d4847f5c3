#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, Triton kernels under the CPU interpreter included.
# Extra arguments go to pytest, e.g. `scripts/test.sh -m "not slow"` for the fast subset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
# No HF_HUB_OFFLINE: the Hub tests talk to a local server (tests/hub_server.py); CI has no other network.
export TRITON_INTERPRET=1 HF_HUB_DISABLE_TELEMETRY=1
python -m pytest -q -ra "$@"
