"""The Triton kernels compile for a real GPU (sm_90, through ptxas) on a machine without one.

The interpreter runs the kernels' Python with plain integers and numpy, so it misses what only the
compiler checks: loop-carried values changing type, constexpr arithmetic, unsupported casts. This
test compiles every kernel for every source/activation dtype in a subprocess with
``TRITON_INTERPRET`` unset (the JIT mode is fixed when the kernels are first imported).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent('''
    import pathlib
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from tpde_hf.triton_kernels import triton_impl as ti

    TARGET = GPUTarget("cuda", 90, 32)
    TYPES = dict(
        qweight_ptr="*u8", scales_ptr="*fp16", zeros_ptr="*u8", words_ptr="*i16", raw_ptr="*i32",
        lane_state_ptr="*i32", word_start_ptr="*i32", raw_start_ptr="*i32", step_lut_ptr="*i32",
        sym_lut_ptr="*i16", sym_info_ptr="*i16", final_ptr="*i64", y_ptr="*fp32", out_f="i32", in_f="i32",
        n_lanes="i32",
        steps="i32", d_row="i32", d_col="i32", q_stride="i32", s_stride="i32", z_stride="i32",
        n_words="i32", n_raw_words="i32", M="i32", N="i32", K="i32", x_stride="i32", part_ptr="*fp32",
        ticket_ptr="*i32", groups_per_split="i32", k_bytes="i32")
    PTR = {1: "*bf16", 2: "*fp16", 3: "*fp32"}
    SPLIT_TABLES = dict(step_lut_ptr="*i16", sym_lut_ptr="*i32")  # slot_sym, sym_step
    BITS = {1: "*i16", 2: "*i16", 3: "*i32"}

    CUOBJDUMP = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    spills = {}

    def build(fn, consts, num_warps=4, **types):
        sig = {a: "constexpr" if a in consts else types.get(a, TYPES.get(a)) for a in fn.arg_names}
        kernel = triton.compile(ASTSource(fn, sig, consts), target=TARGET, options=dict(num_warps=num_warps))
        if CUOBJDUMP.exists():  # per-thread stack = registers spilled to local memory
            with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
                f.write(kernel.asm["cubin"])
                f.flush()
                usage = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True).stdout
            spills[f"{fn.__name__} {sorted(consts.items())}"] = int(re.findall(r"STACK:(\\d+)", usage)[-1])

    for code, width in ((1, 16), (2, 16), (3, 32)):
        for nsym, tables in ((0, {}), (64 + (width - 6) * 32, SPLIT_TABLES)):  # fused, then split tables
            for off64 in (False, True):
                build(ti._reconstruct_kernel, dict(G=128, PB=12, WIDTH=width, CODE=code, BLOCK_L=ti.BLOCK_LANES,
                                                   CHECK=True, NSYM=nsym, OFF64=off64), ti.BLOCK_LANES // 32,
                      out_ptr=BITS[code], **tables)
        build(ti._base_weight_kernel, dict(G=32, CODE=code, WIDTH=width, BLOCK_R=16, BLOCK_C=128),
              out_ptr=BITS[code])
        for xcode in (1, 2, 3):
            for nsym, tables in ((0, {}), (64 + (width - 6) * 32, SPLIT_TABLES)):
                build(ti._fused_gemv_kernel, dict(G=64, PB=10, WIDTH=width, CODE=code, XCODE=xcode,
                                                  BLOCK_L=ti.FUSED_BLOCK_LANES, BLOCK_M=16, ROWS=2, NSYM=nsym,
                                                  OFF64=False),
                      ti.FUSED_BLOCK_LANES // 32, x_ptr=PTR[xcode], **tables)
            # the launcher's configurations: 16 rows for decode, 64 above; one split and several
            for block_m, split, g in ((16, 1, 128), (16, 4, 32), (64, 4, 128)):
                build(ti._base_matmul_kernel, dict(G=g, CODE=code, XCODE=xcode, HAS_BIAS=True, BLOCK_M=block_m,
                                                   BLOCK_N=32 if xcode == 3 else 64, KB=ti.BASE_BLOCK_K_BYTES,
                                                   DOT_F32=xcode == 3, SPLIT=split),
                      x_ptr=PTR[xcode], y_ptr=BITS[xcode], bias_ptr=PTR[xcode])
    # int64 offsets (tensors past 2**31 raw bits) and a one-row batch
    build(ti._fused_gemv_kernel, dict(G=32, PB=15, WIDTH=16, CODE=1, XCODE=1, BLOCK_L=64, BLOCK_M=1, ROWS=16,
                                      NSYM=0, OFF64=True),
          2, x_ptr="*bf16", word_start_ptr="*i64", raw_start_ptr="*i64", n_raw_words="i64")
    print("compiled")
    spilled = {k: v for k, v in spills.items() if v > 64}  # a few bytes of frame are noise
    print("spills checked:", len(spills), "spilled:", spilled)
''')


def _has_nvidia_backend() -> bool:
    try:
        import triton.backends

        return "nvidia" in triton.backends.backends
    except Exception:
        return False


@pytest.mark.skipif(not _has_nvidia_backend(), reason="triton's NVIDIA backend (ptxas) is not installed")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "compiled" in proc.stdout
    # Local-memory spills are the first thing that slows a GPU kernel: the default configurations have none
    # (a whole 128-group per K step spilled up to 1 KB per thread in the base matmul).
    assert "spilled: {}" in proc.stdout, proc.stdout[-2000:]
