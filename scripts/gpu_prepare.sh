#!/usr/bin/env bash
# Here, before a device call (see scripts/gpu_session.sh): gather what the GPU machine lacks.
# - .whl/: wheels of the Python packages tpde-hf imports that its image does not hold (zstandard),
#   for its Python 3.12 (it has no network);
# - benchmarks/results/tmp/gpu/value_pool.npy: 4M real weight values (all-MiniLM-L6-v2) that the
#   kernel benchmark resamples, since that package is not installed there.
# Both paths are git-ignored; name them in the device call's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
mkdir -p .whl benchmarks/results/tmp/gpu
python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "zstandard>=0.22"
python benchmarks/bench_kernels.py --write-value-pool benchmarks/results/tmp/gpu/value_pool.npy
du -sh .whl benchmarks/results/tmp/gpu
