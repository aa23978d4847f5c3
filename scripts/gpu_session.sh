#!/usr/bin/env bash
# Issue #3's GPU checks in one device call: the compiled kernels' tests, then the kernel benchmark
# (the issue's figures, then the encoder and base-matmul sweeps). Each step has its own time limit
# and the benchmark saves after every section, so a slow step still returns what it measured.
#
#   bash scripts/gpu_prepare.sh                                  # here, once
#   device run: command="bash scripts/gpu_session.sh", timeout_s=560,
#               carry=[".whl", "benchmarks/results/tmp/gpu"]
#
# Files land in $OUT (the device tool's folder; benchmarks/results/gpu when run by hand):
# machine.txt, gpu_tests.log, bench.log, kernels.json. Then, here, keeping the CPU figures:
#   python benchmarks/bench_kernels.py --merge-gpu <files_at>/kernels.json
#   python benchmarks/run_all.py --report-only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET  # compiled kernels, not the interpreter
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv
  python3 -c "import torch, triton, transformers, numba; print('torch', torch.__version__, '| triton', \
triton.__version__, '| transformers', transformers.__version__, '| numba', numba.__version__)"
} 2>&1 | tee "$OUT/machine.txt"

# Most of the tests' time is Triton compiling each kernel variant: spread it over the CPU cores.
parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
timeout "${GPU_TEST_LIMIT:-200}" python3 -m pytest -q -p no:cacheprovider $parallel -m gpu tests/test_triton_kernels.py tests/test_class_width_kernels.py tests/test_delta_code.py \
  > "$OUT/gpu_tests.log" 2>&1
tests_rc=$?
tail -n 20 "$OUT/gpu_tests.log"

pool=benchmarks/results/tmp/gpu/value_pool.npy
timeout "${GPU_BENCH_LIMIT:-300}" python3 benchmarks/bench_kernels.py --skip-cpu --sweep \
  ${GPU_BENCH_ARGS:-} $([ -f "$pool" ] && echo --value-pool "$pool") --out "$OUT/kernels.json" > "$OUT/bench.log" 2>&1
bench_rc=$?
grep -v '^sweep' "$OUT/bench.log" | tail -n 40  # the summary table is printed last

echo "gpu tests rc=$tests_rc | benchmark rc=$bench_rc"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
