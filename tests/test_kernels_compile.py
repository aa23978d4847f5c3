"""The Triton kernels compile for a real GPU (sm_90, through ptxas) on a machine without one.

The interpreter runs the kernels' Python with plain integers and numpy, so it misses what only the
compiler checks: loop-carried values changing type, constexpr arithmetic, unsupported casts. This
test runs ``benchmarks/sass_counts.py --check`` in a subprocess with ``TRITON_INTERPRET`` unset (the
JIT mode is fixed when the kernels are first imported): it compiles every kernel for every
source/activation dtype, table form and offset width, fails on register spills, and counts the SASS
instructions of each launch default's hot loop.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _has_nvidia_backend() -> bool:
    try:
        import triton.backends

        return "nvidia" in triton.backends.backends
    except Exception:
        return False


def _has_cuobjdump() -> bool:
    import triton

    return (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump").exists()


@pytest.mark.skipif(not _has_nvidia_backend() or not _has_cuobjdump(),
                    reason="triton's NVIDIA backend (ptxas, cuobjdump) is not installed")
def test_every_kernel_compiles_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = tmp_path / "sass_counts.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sass_counts.py"), "--check", "--out", str(out)],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    # Local-memory spills are the first thing that slows a GPU kernel: --check exits 1 on any (a whole
    # 128-group per K step once spilled up to 1 KB per thread in the base matmul).
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "spilled over 64 B: {}" in proc.stdout
    kernels = json.loads(out.read_text())["kernels"]
    assert {name.split(",")[0] for name in kernels} == {"reconstruct", "fused lossless GEMV", "base matmul",
                                                        "class-width reconstruct (study)", "class-width fused GEMV"}
    for name, figures in kernels.items():
        assert figures["loop_instructions"] > 0 and figures["stack"] <= 64, name
        # a decode step is a chain of table reads and integer work; a base weight, a few instructions
        low, high = (20, 400) if "base" not in name else (2, 20)
        assert low < figures["instructions_per_element"] < high, (name, figures)
