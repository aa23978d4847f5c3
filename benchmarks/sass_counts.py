"""Static figures of the Triton kernels on sm_90, read from the compiled SASS: no GPU needed.

Compiles each kernel for an H100/H200 (``sm_90``, through Triton's bundled ``ptxas``), disassembles it
with the bundled ``cuobjdump`` and reports, per launch default:

* ``loop_instructions``: the SASS instructions of the kernel's hot loop (its longest backward branch);
* ``instructions_per_element``: those divided by the elements each thread handles per iteration;
* ``elements_per_cycle_per_sm``: the issue ceiling, 4 warp-instructions per cycle per SM;
* registers and stack (stack = registers spilled to local memory, the first thing that slows a kernel).

``--check`` also compiles the whole matrix of kernels x source dtypes x activation dtypes x table
forms x offset widths, and fails on any spill above 64 bytes; ``tests/test_kernels_compile.py`` runs it.
It unsets ``TRITON_INTERPRET`` for itself (the kernels fix their JIT mode when first imported)::

    python benchmarks/sass_counts.py --out benchmarks/results/sass_counts.json
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

# The interpreter compiles nothing, and the kernels fix their JIT mode when first imported.
os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, set to silence its warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from tpde_hf.triton_kernels import class_width_kernels as cwk  # noqa: E402
from tpde_hf.triton_kernels import triton_impl as ti  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
#: Argument types shared by the kernels (per-kernel overrides in :class:`Build`).
TYPES = dict(
    qweight_ptr="*u8", scales_ptr="*fp16", zeros_ptr="*u8", words_ptr="*i16", raw_ptr="*i32",
    lane_state_ptr="*i32", word_start_ptr="*i32", raw_start_ptr="*i32", step_lut_ptr="*i32",
    sym_lut_ptr="*i16", sym_info_ptr="*i16", final_ptr="*i64", y_ptr="*fp32", out_f="i32", in_f="i32",
    n_lanes="i32", steps="i32", d_row="i32", d_col="i32", q_stride="i32", s_stride="i32", z_stride="i32",
    n_words="i32", n_raw_words="i32", M="i32", N="i32", K="i32", x_stride="i32", part_ptr="*fp32",
    ticket_ptr="*i32", groups_per_split="i32", header_ptr="*i32", offsets_ptr="*i32", ng="i32", n_spans="i32")
#: What the JIT specializes at model shapes (4096, 11008, ...): 16-byte aligned pointers, and sizes and
#: strides that are multiples of 16. Register allocation, and so spilling, depends on them.
ALIGNED = {"N", "K", "in_f", "out_f", "x_stride", "q_stride", "s_stride", "z_stride"}
CODES = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}
DTYPES = {v: k for k, v in CODES.items()}
PTR = {1: "*bf16", 2: "*fp16", 3: "*fp32"}
BITS = {1: "*i16", 2: "*i16", 3: "*i32"}
WIDTH = {1: 16, 2: 16, 3: 32}
SPLIT_TABLES = dict(step_lut_ptr="*i16", sym_lut_ptr="*i32")  # slot_sym, sym_step
#: Spill allowance: a few bytes of stack frame are noise.
SPILL_LIMIT = 64


@dataclass
class Build:
    """One kernel configuration; ``elements`` = weights each thread handles per hot-loop iteration."""

    fn: object
    consts: dict
    num_warps: int = 4
    types: dict = field(default_factory=dict)
    elements: float = 1.0

    @property
    def name(self) -> str:
        return f"{self.fn.__name__} {sorted(self.consts.items())}"

    def compile(self):
        sig = {a: "constexpr" if a in self.consts else self.types.get(a, TYPES.get(a)) for a in self.fn.arg_names}
        attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(self.fn.arg_names)
                 if a not in self.consts and (sig[a].startswith("*") or a in ALIGNED)}
        return triton.compile(ASTSource(self.fn, sig, self.consts, attrs), target=TARGET,
                              options=dict(num_warps=self.num_warps))


def _cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(CUOBJDUMP), flag, f.name], capture_output=True, text=True, check=True).stdout


def resources(cubin: bytes) -> dict:
    """Registers per thread and stack bytes per thread of a compiled kernel."""
    usage = _cuobjdump(cubin, "-res-usage")
    return {"registers": int(re.findall(r"REG:(\d+)", usage)[-1]), "stack": int(re.findall(r"STACK:(\d+)", usage)[-1])}


def hot_loop(cubin: bytes) -> collections.Counter:
    """Opcode counts of the longest loop (backward branch) of the kernel's SASS."""
    code = []
    for line in _cuobjdump(cubin, "-sass").splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            code.append((int(m.group(1), 16), m.group(2).strip()))
    best: list[str] = []
    for addr, text in code:
        m = re.search(r"BRA (0x[0-9a-f]+)", text)
        if m and int(m.group(1), 16) < addr:
            body = [t for a, t in code if int(m.group(1), 16) <= a <= addr]
            best = max(best, body, key=len)
    return collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for t in best)


def default_builds() -> dict[str, Build]:
    """The launchers' defaults for bf16 (fp16 for the base matmul too), named as in the report."""
    builds = {}
    for tables, nsym, extra in (("fused", 0, {}), ("split", 64 + 10 * 32, SPLIT_TABLES)):
        builds[f"reconstruct, {tables} tables"] = Build(
            ti._reconstruct_kernel, dict(G=128, PB=12, WIDTH=16, CODE=1, BLOCK_L=ti.BLOCK_LANES, CHECK=False,
                                         NSYM=nsym, OFF64=False),
            ti.BLOCK_LANES // 32, dict(out_ptr="*i16", **extra))
    builds["fused lossless GEMV, batch 1"] = Build(
        ti._fused_gemv_kernel, dict(G=128, PB=12, WIDTH=16, CODE=1, XCODE=1, BLOCK_L=ti.FUSED_BLOCK_LANES,
                                    BLOCK_M=1, ROWS=2, NSYM=0, OFF64=False),
        ti.FUSED_BLOCK_LANES // 32, dict(x_ptr="*bf16"))
    for dtype, m in ((torch.bfloat16, 16), (torch.float16, 16), (torch.bfloat16, 64)):
        short = {torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        code = CODES[dtype]
        block_n, kb = ti.BASE_BLOCKS[dtype]
        label = "decode (M <= 16)" if m == 16 else "prefill (M > 16)"
        builds[f"base matmul, {short}, {label}"] = Build(
            ti._base_matmul_kernel, dict(G=128, CODE=code, XCODE=code, HAS_BIAS=False, BLOCK_M=m, BLOCK_N=block_n,
                                         KB=kb, DOT_F32=False, SPLIT=4, K_TAIL=False),
            4, dict(x_ptr=PTR[code], y_ptr=BITS[code], bias_ptr=PTR[code], qweight_ptr="*i32"),
            elements=block_n * 128 / (4 * 32))  # one 128-group of BLOCK_N rows per iteration, 128 threads
    cw_elements = cwk.CW_BLOCK_R * 128 / (cwk.CW_NUM_WARPS * 32)  # one [BLOCK_R, G] tile per iteration
    builds["class-width reconstruct (study)"] = Build(
        cwk._cw_reconstruct_kernel, dict(G=128, WIDTH=16, CODE=1, BLOCK_R=cwk.CW_BLOCK_R, K_TAIL=False),
        cwk.CW_NUM_WARPS, dict(words_ptr="*i32", out_ptr="*i16"), elements=cw_elements)
    for m in (1, 16):
        builds[f"class-width fused GEMV, batch {m} (study)"] = Build(
            cwk._cw_fused_gemv_kernel, dict(G=128, WIDTH=16, CODE=1, XCODE=1, BLOCK_R=cwk.CW_BLOCK_R, BLOCK_M=m,
                                            K_TAIL=False),
            cwk.CW_NUM_WARPS, dict(words_ptr="*i32", x_ptr="*bf16"), elements=cw_elements)
    return builds


def _class_width_matrix() -> list[Build]:
    out = []
    for code in (1, 2, 3):
        width = WIDTH[code]
        for offsets in ("*i32", "*i64"):  # payloads under and over 2**31 bits
            out.append(Build(cwk._cw_reconstruct_kernel,
                             dict(G=64, WIDTH=width, CODE=code, BLOCK_R=cwk.CW_BLOCK_R, K_TAIL=True),
                             cwk.CW_NUM_WARPS, dict(words_ptr="*i32", out_ptr=BITS[code], offsets_ptr=offsets)))
        for xdtype, xcode in CODES.items():
            for block_m in (1, cwk.fused_max_m(DTYPES[code], xdtype)):
                out.append(Build(cwk._cw_fused_gemv_kernel,
                                 dict(G=128, WIDTH=width, CODE=code, XCODE=xcode, BLOCK_R=cwk.CW_BLOCK_R,
                                      BLOCK_M=block_m, K_TAIL=block_m == 1),
                                 cwk.CW_NUM_WARPS, dict(words_ptr="*i32", x_ptr=PTR[xcode])))
    return out


def matrix() -> list[Build]:
    """Every kernel for every source dtype, activation dtype, table form and offset width."""
    out = []
    for code in (1, 2, 3):
        width = WIDTH[code]
        for nsym, tables in ((0, {}), (64 + (width - 6) * 32, SPLIT_TABLES)):
            for off64 in (False, True):
                out.append(Build(ti._reconstruct_kernel, dict(G=128, PB=12, WIDTH=width, CODE=code,
                                                               BLOCK_L=ti.BLOCK_LANES, CHECK=True, NSYM=nsym,
                                                               OFF64=off64),
                                 ti.BLOCK_LANES // 32, dict(out_ptr=BITS[code], **tables)))
        out.append(Build(ti._base_weight_kernel, dict(G=32, CODE=code, WIDTH=width, BLOCK_R=16, BLOCK_C=128),
                         types=dict(out_ptr=BITS[code])))
        for xdtype, xcode in CODES.items():
            for nsym, tables in ((0, {}), (64 + (width - 6) * 32, SPLIT_TABLES)):
                out.append(Build(ti._fused_gemv_kernel, dict(G=64, PB=10, WIDTH=width, CODE=code, XCODE=xcode,
                                                              BLOCK_L=ti.FUSED_BLOCK_LANES, BLOCK_M=16, ROWS=2,
                                                              NSYM=nsym, OFF64=False),
                                 ti.FUSED_BLOCK_LANES // 32, dict(x_ptr=PTR[xcode], **tables)))
            # the launcher's configurations: 16 rows for decode, 64 above; one split and several
            block_n, kb = ti.BASE_BLOCKS[xdtype]
            for block_m, split, g, tail in ((16, 1, 128, False), (16, 4, 32, True), (64, 4, 128, False)):
                out.append(Build(ti._base_matmul_kernel,
                                 dict(G=g, CODE=code, XCODE=xcode, HAS_BIAS=True, BLOCK_M=block_m, BLOCK_N=block_n,
                                      KB=min(kb, g // 2), DOT_F32=xcode == 3, SPLIT=split, K_TAIL=tail),
                                 types=dict(x_ptr=PTR[xcode], y_ptr=BITS[xcode], bias_ptr=PTR[xcode],
                                            qweight_ptr="*i32")))
    # int64 offsets (tensors past 2**31 raw bits) and a one-row batch
    out.append(Build(ti._fused_gemv_kernel, dict(G=32, PB=15, WIDTH=16, CODE=1, XCODE=1, BLOCK_L=64, BLOCK_M=1,
                                                  ROWS=16, NSYM=0, OFF64=True),
                     2, dict(x_ptr="*bf16", word_start_ptr="*i64", raw_start_ptr="*i64", n_raw_words="i64")))
    return out + _class_width_matrix()


def count(build: Build) -> dict:
    """The figures of one configuration (see the module docstring)."""
    cubin = build.compile().asm["cubin"]
    ops = hot_loop(cubin)
    n = sum(ops.values())
    return {**resources(cubin), "loop_instructions": n, "elements_per_iteration": build.elements,
            "instructions_per_element": round(n / build.elements, 2),
            "elements_per_cycle_per_sm": round(128 / (n / build.elements), 2),
            "top_opcodes": dict(ops.most_common(8))}


def check_matrix() -> dict[str, int]:
    """Compile the whole matrix; returns the configurations whose stack exceeds :data:`SPILL_LIMIT`."""
    spilled = {}
    for build in matrix():
        stack = resources(build.compile().asm["cubin"])["stack"]
        if stack > SPILL_LIMIT:
            spilled[build.name] = stack
    return spilled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "sass_counts.json",
                        help="the figures of the launch defaults (JSON; default: %(default)s)")
    parser.add_argument("--check", action="store_true",
                        help=f"also compile the whole matrix; exit 1 on a spill over {SPILL_LIMIT} bytes")
    args = parser.parse_args()
    if not CUOBJDUMP.exists():  # e.g. a triton without its NVIDIA backend: nothing to count, not a failure
        print(f"skipped: {CUOBJDUMP} is missing (it comes with triton's NVIDIA backend); {args.out} left as it is")
        return
    figures = {name: count(build) for name, build in default_builds().items()}
    for name, f in figures.items():
        print(f"{name:45s} {f['instructions_per_element']:7.2f} instr/element  {f['registers']:3d} regs  "
              f"{f['stack']:4d} B stack")
    result = {"benchmark": "sass", "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
              "machine": f"{platform.platform().split('-with-')[0]}, static analysis (no device)", "target": "sm_90",
              "triton": triton.__version__, "kernels": figures}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.check:
        spilled = check_matrix()
        print(f"matrix compiled: {len(matrix())} configurations; spilled over {SPILL_LIMIT} B: {spilled}")
        if spilled:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
