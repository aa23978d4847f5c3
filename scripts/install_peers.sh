#!/usr/bin/env bash
# Install the peer compressors that benchmarks/bench_peers.py compares tpde-hf against (issue 18),
# into their own virtual environment, .venv-peers, apart from the project's .venv.
#
# The peers are for comparison only. They are never dependencies of tpde-hf, nothing in tpde_hf/
# imports them, and nothing of theirs is shipped or vendored: we only download and run them here.
# Mind their licences:
#   glyd 0.32.1      BUSL-1.1 (Business Source License: running it to measure is fine; it is not ours
#                    to redistribute or to build a competing service on)
#   bigsmall 4.0.0   Elastic-2.0 (source-available: run it, do not ship it or offer it as a service)
#   lmzip 1.3.0      MIT
#   ZipNN 0.5.4      MIT
#   DFloat11 0.5.0   Apache-2.0 (only its encoder runs here: its decoder is a CUDA kernel via cupy)
#
# Each peer is installed on its own, so that one failing leaves the others usable; pip's output for
# each goes to .venv-peers/install-logs/<peer>.log, and a failure leaves <peer>.failed there, which
# the benchmark reports as "not installed: <pip error>" instead of dropping the peer.
#
# DFloat11's package imports cupy (CUDA) and pulls transformers and accelerate at install time; its
# encoder (dfloat11/dfloat11_utils.py) needs only torch, numpy, dahuffman and tqdm. So it is
# installed with --no-deps plus those, and the benchmark loads that one module by path.
# torch is pinned as in scripts/setup.sh (the CPU wheel this machine keeps), before anything that
# could pull several GB of CUDA wheels.
#
# Usage: scripts/install_peers.sh            (idempotent; PEERS_VENV=path to put the venv elsewhere)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${PEERS_VENV:-.venv-peers}
LOGS="$VENV/install-logs"

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV" || { echo "cannot create $VENV" >&2; exit 1; }
fi
mkdir -p "$LOGS"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check)
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true

# name | pip arguments
PEERS=(
  "common|numpy safetensors zstandard"
  "torch|torch==2.13.0"
  "zipnn|zipnn==0.5.4"
  "lmzip|lmzip==1.3.0"
  "glyd|glyd==0.32.1"
  "bigsmall|bigsmall==4.0.0"
  "dfloat11|--no-deps dfloat11==0.5.0 dahuffman==0.4.2 tqdm"
)

status=0
for entry in "${PEERS[@]}"; do
  name=${entry%%|*}
  args=${entry#*|}
  rm -f "$LOGS/$name.failed"
  # shellcheck disable=SC2086  # the arguments are meant to split
  if "${PIP[@]}" $args >"$LOGS/$name.log" 2>&1; then
    echo "installed $name ($args)"
  else
    cp "$LOGS/$name.log" "$LOGS/$name.failed"
    echo "FAILED to install $name ($args): see $LOGS/$name.log" >&2
    status=1
  fi
done

# Which versions landed, for the record.
"$VENV/bin/python" -m pip list --disable-pip-version-check 2>/dev/null \
  | grep -i -E '^(zipnn|lmzip|glyd|bigsmall|dfloat11|dahuffman|numba|constriction|torch|numpy|zstandard) ' || true
exit $status
