"""The Triton kernels and their launchers (imported lazily: only when a Triton path runs).

GPU design
----------
**Decode (shared by reconstruct and the fused GEMV).** One program owns ``BLOCK_L`` consecutive
lanes and keeps their rANS states, word pointers and raw-bit pointers in registers for the whole
lane (``steps`` iterations). At step ``e`` lane ``j`` decodes element ``e * n_lanes + j``, so the
block covers ``BLOCK_L`` *consecutive* elements: the base loads (context, scale), the ``x`` loads
of the GEMV and the output stores are all coalesced. The row/column of each lane's element advance
by a constant per step (``n_lanes = dr * in + dc``), so no division runs in the loop. Per step and
lane: one gather from ``step_lut`` on the serial chain (``x -> slot -> lut -> x``), one 16-bit
word load, one gather from ``sym_lut`` and at most two 32-bit raw loads. Everything that does not
depend on the state is issued a step ahead (the next element's base, the next word), so a step's
latency is the table gather plus a few integer operations.

What bounds it: a weight has ``numel / lane_len`` independent chains of ``lane_len`` dependent
steps (16,384 chains of 1,024 steps for 4096x4096 at the default lane length, about 4 warps per
SM on an H100), so the decode is latency-bound; and at ``prob_bits = 12`` the step table is
17 x 4096 x 4 bytes, larger than L1, so most gathers go to L2. ``lane_len = 256`` (4x the chains,
+0.16 bit/weight on MiniLM) and ``prob_bits = 10`` (a 70 KB table, +0.02 bit/weight) are both
encoder choices within format version 1. A third lever costs no bits: ``PackedWeight(tables="split")``
replaces the two slot-indexed tables (278 + 139 KB) by a slot -> symbol table (139 KB) and
symbol-indexed steps (26 KB) and symbol info (< 2 KB): two dependent gathers per step instead of
one, but from tables that may stay in L1 (``NSYM > 0`` in the kernels). Which of the three wins is
for the GPU to say: ``scripts/gpu_session.sh`` measures all of them in one run.

**Reconstruct** then writes the element's source bits. The prediction ``P = c * scale`` is exact in
float32; the cast to the source dtype is the only rounding, round-to-nearest-even as torch does.
Compiled, bf16 uses the hardware conversion (``cvt.rn``); under the interpreter, which truncates
float32 -> bfloat16, the same rounding is written out in integer arithmetic (``_HW_BF16_ROUND``).

Instruction counts per step (SASS, sm_90, Triton 3.9, bf16, int32 offsets; read with cuobjdump, no
GPU needed; ``benchmarks/sass_counts.py``): reconstruct 108 (118 with split tables), fused GEMV 170;
the base matmul 5.7 per weight at its default 16 x 128 tile. At 4 warp-instructions per cycle per SM
those are ceilings of about 1.2, 0.75 and 22.4 weights per cycle per SM even with every latency hidden.

**Fused GEMV (decode, batch 1..16)** multiplies each decoded element by ``x[:, col]`` and reduces
the block per output row (a block spans at most ``ROWS`` rows), then adds the per-row partial sums
into a float32 ``[M, out]`` buffer with atomics. A program is one warp (``FUSED_BLOCK_LANES``), so
the per-step reduction needs no block barrier. The split over lanes is a split-K: a row's
``in`` elements are decoded by ``in / BLOCK_L`` programs. A deterministic partial-sum buffer would
cost ``8 / BLOCK_L`` bytes per weight per batch row of extra traffic; atomics keep it in L2.
Float32 atomics make the summation order (and so the last bits of ``y``) vary between runs: this
path is "equal to ``F.linear`` within matmul tolerance", never bit-exact.

**Prefill (large batch)** does *not* fuse: the decode costs the same whatever the batch, and a
fused GEMM would have to re-decode every weight tile once per ``M`` tile (rANS lanes run the whole
height of the weight, so a tile cannot be decoded alone). Reconstructing once into a scratch buffer
and calling cuBLAS costs one decode plus a bf16 write/read of the weight, small next to the
``O(M * out * in)`` matmul, and the result is bit-identical to the dense model.

The base-only 4-bit matmul and the base weight live in :mod:`tpde_hf.triton_kernels.base_kernels`
(re-exported here, where the dispatcher looks them up).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tpde_hf.codec.ordinal import DTYPE_CODES, INT_VIEW
from tpde_hf.errors import TpdeFormatError
from tpde_hf.triton_kernels.base_kernels import (  # noqa: F401  (re-exported: the dispatcher's launchers)
    _TICKETS,
    BASE_BLOCKS,
    _base_matmul_kernel,
    _base_weight_kernel,
    base_linear,
    base_weight,
)
from tpde_hf.triton_kernels.device_common import (  # noqa: F401  (re-exported for class_width_kernels)
    _BF16,
    _FP16,
    _FP32,
    _bits_from_f32,
    _check_out,
    _f32_from_bits,
    _level_scale,
    _offset,
    interpreting,
)
from tpde_hf.triton_kernels.packed import IDENTITY_CONTEXT, SYM_HI_BITS, PackedWeight

# Constants the kernels read (Triton wants module globals as constexpr).
_IDENTITY: tl.constexpr = tl.constexpr(IDENTITY_CONTEXT)
_HI_BITS: tl.constexpr = tl.constexpr(SYM_HI_BITS)
_HI_MASK: tl.constexpr = tl.constexpr((1 << SYM_HI_BITS) - 1)

#: Lanes per program of the reconstruct kernel. 64 lanes = 2 warps of one lane per thread: enough
#: programs to spread over the SMs for a 4096x4096 weight (16,384 lanes -> 256 programs) with the
#: default lane length.
BLOCK_LANES = 64
#: Lanes per program of the fused GEMV: one warp, so that the per-step reduction over the block is
#: warp shuffles alone. With 64 lanes (2 warps) the compiled loop held 8 block barriers per step
#: (sm_90, Triton 3.9), each one exposing the other warp's latency.
FUSED_BLOCK_LANES = 32
#: Batch rows per program of the fused GEMV (more rows re-launch over row chunks).
FUSED_BLOCK_M = 16


# ============================================================================ device helpers
@triton.jit
def _wide(v, OFF64: tl.constexpr):
    """``v`` as an offset: int64 where the tensors need it, else left int32."""
    if OFF64:
        return v.to(tl.int64)
    else:
        return v


@triton.jit
def _next_element(qweight_ptr, scales_ptr, zeros_ptr, row, col, d_row, d_col, lane_ok, out_f, in_f, q_stride,
                  s_stride, z_stride, G: tl.constexpr, OFF64: tl.constexpr):
    """Each lane's next element (``n_lanes`` further on, i.e. ``d_row`` rows and ``d_col`` columns), and
    its level, scale and validity: loaded one step ahead so the loads overlap the current step."""
    col_n = col + d_col
    wrapped = col_n >= in_f
    col_n = tl.where(wrapped, col_n - in_f, col_n)
    row_n = row + d_row + wrapped.to(tl.int32)
    c_n, s_n, valid_n = _element(qweight_ptr, scales_ptr, zeros_ptr, row_n, col_n, lane_ok, out_f, q_stride,
                                 s_stride, z_stride, G, OFF64)
    return row_n, col_n, c_n, s_n, valid_n


@triton.jit
def _element(qweight_ptr, scales_ptr, zeros_ptr, row, col, lane_ok, out_f, q_stride, s_stride, z_stride,
             G: tl.constexpr, OFF64: tl.constexpr):
    """``(c, scale, valid)`` of the element each lane decodes next: its context and prediction inputs."""
    valid = lane_ok & (row < out_f)
    c, s = _level_scale(qweight_ptr, scales_ptr, zeros_ptr, _wide(row, OFF64), col, valid, q_stride, s_stride,
                        z_stride, G)
    return c, s, valid


@triton.jit
def _decode_step(x, word, wptr, rpos, c, s, valid, words_ptr, raw_ptr, step_lut_ptr, sym_lut_ptr, sym_info_ptr,
                 n_words, n_raw_words, PB: tl.constexpr, WIDTH: tl.constexpr, CODE: tl.constexpr,
                 NSYM: tl.constexpr):
    """One rANS step of a block of lanes; returns the new lane registers and the element's bits.

    ``x`` (uint32) is the state, ``word`` the (already loaded) word at ``wptr``, ``rpos`` the next
    raw bit. Invalid elements (past the end, or lanes not owned) take the identity context, which
    leaves the state unchanged and reads nothing. ``NSYM`` is 0 for the fused tables, else the
    alphabet size of the split tables (``PackedWeight`` module docstring).
    """
    ctx = tl.where(valid, tl.abs(c), _IDENTITY)
    slot = (x & ((1 << PB) - 1)).to(tl.int32)
    idx = (ctx << PB) | slot
    if NSYM == 0:  # fused tables: x -> slot -> step_lut -> x (-> renormalize with the preloaded word)
        p = tl.load(step_lut_ptr + idx).to(tl.uint32, bitcast=True)
        x = (x >> PB) * (p & 0xFFFF) + (p >> 16)
        info = tl.load(sym_lut_ptr + idx).to(tl.int32)  # off the chain
    else:  # split tables (step_lut_ptr = slot_sym, sym_lut_ptr = sym_step): x -> slot -> symbol -> step -> x
        sym = tl.load(step_lut_ptr + idx).to(tl.int32)
        p = tl.load(sym_lut_ptr + ctx * NSYM + sym).to(tl.uint32, bitcast=True)
        x = (x >> PB) * (p & 0xFFFF) + (slot.to(tl.uint32) - (p >> 16))
        info = tl.load(sym_info_ptr + sym).to(tl.int32)  # off the chain
    need = x < 65536
    x = tl.where(need, (x << 16) | word, x)
    wptr += need.to(wptr.dtype)
    # Preload the next word now, so that its latency overlaps the next step's table lookup.
    word = tl.load(words_ptr + wptr, mask=wptr < n_words, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)
    # Off the chain: the symbol's value bits and its raw low bits (64-bit window, LSB first).
    hi = (info & _HI_MASK).to(tl.uint32)
    nraw = info >> _HI_BITS
    k = rpos >> 5
    has = nraw > 0
    lo_w = tl.load(raw_ptr + k, mask=has & (k < n_raw_words), other=0).to(tl.uint32, bitcast=True)
    hi_w = tl.load(raw_ptr + k + 1, mask=has & (k + 1 < n_raw_words), other=0).to(tl.uint32, bitcast=True)
    window = lo_w.to(tl.uint64) | (hi_w.to(tl.uint64) << 32)
    raw = (window >> (rpos & 31).to(tl.uint64)) & ((tl.full(nraw.shape, 1, tl.uint64) << nraw.to(tl.uint64)) - 1)
    rpos += nraw.to(rpos.dtype)
    u = (hi << nraw.to(tl.uint32)) | raw.to(tl.uint32)
    # r = unzigzag(u); W = ord^-1(ord(P) + r), all modulo 2**WIDTH (ord is an involution on bits).
    r = (u >> 1) ^ (0 - (u & 1))
    pbits = _bits_from_f32(c.to(tl.float32) * s, CODE)
    return x, word, wptr, rpos, ordinal_add(pbits, r, WIDTH)


@triton.jit
def ordinal_add(pbits, r, WIDTH: tl.constexpr):
    """``ord^-1(ord(P) + r)`` on uint32 bit patterns, modulo ``2**WIDTH`` (ord is an involution on bits)."""
    MAG: tl.constexpr = (1 << (WIDTH - 1)) - 1
    return bits_of_ordinal((pbits ^ ((pbits >> (WIDTH - 1)) * MAG)) + r, WIDTH)


@triton.jit
def bits_of_ordinal(o, WIDTH: tl.constexpr):
    """The bit pattern (uint32) whose ordinal is ``o`` modulo ``2**WIDTH``."""
    MAG: tl.constexpr = (1 << (WIDTH - 1)) - 1
    if WIDTH == 16:
        o = o & 0xFFFF
    return o ^ ((o >> (WIDTH - 1)) * MAG)


@triton.jit
def _lane_setup(lane_state_ptr, word_start_ptr, raw_start_ptr, words_ptr, n_lanes, in_f, n_words,
                BLOCK_L: tl.constexpr):
    """Registers of the program's lanes: state, first word (loaded), pointers, first element."""
    lanes = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    lane_ok = lanes < n_lanes
    x = tl.load(lane_state_ptr + lanes, mask=lane_ok, other=65536).to(tl.uint32, bitcast=True)
    wptr = tl.load(word_start_ptr + lanes, mask=lane_ok, other=0)
    word = tl.load(words_ptr + wptr, mask=lane_ok & (wptr < n_words), other=0).to(tl.uint16, bitcast=True)
    rpos = tl.load(raw_start_ptr + lanes, mask=lane_ok, other=0)
    row = lanes // in_f
    return lanes, lane_ok, x, word.to(tl.uint32), wptr, rpos, row, lanes - row * in_f


# ============================================================================ kernels
# Both decode kernels walk each lane's elements n_lanes apart: d_row rows and d_col columns on
# (n_lanes = d_row * in + d_col), so the loop needs no division. The next element's base is loaded
# one step ahead, off the rANS chain.
@triton.jit
def _reconstruct_kernel(
    qweight_ptr, scales_ptr, zeros_ptr, words_ptr, raw_ptr, lane_state_ptr, word_start_ptr, raw_start_ptr,
    step_lut_ptr, sym_lut_ptr, sym_info_ptr, out_ptr, final_ptr,
    out_f, in_f, n_lanes, steps, d_row, d_col, q_stride, s_stride, z_stride, n_words, n_raw_words,
    G: tl.constexpr, PB: tl.constexpr, WIDTH: tl.constexpr, CODE: tl.constexpr,
    BLOCK_L: tl.constexpr, CHECK: tl.constexpr, NSYM: tl.constexpr, OFF64: tl.constexpr,
):
    lanes, lane_ok, x, word, wptr, rpos, row, col = _lane_setup(
        lane_state_ptr, word_start_ptr, raw_start_ptr, words_ptr, n_lanes, in_f, n_words, BLOCK_L)
    c, s, valid = _element(qweight_ptr, scales_ptr, zeros_ptr, row, col, lane_ok, out_f, q_stride, s_stride,
                           z_stride, G, OFF64)
    for _ in range(steps):
        row_n, col_n, c_n, s_n, valid_n = _next_element(qweight_ptr, scales_ptr, zeros_ptr, row, col, d_row, d_col,
                                                        lane_ok, out_f, in_f, q_stride, s_stride, z_stride, G,
                                                        OFF64)
        x, word, wptr, rpos, wbits = _decode_step(x, word, wptr, rpos, c, s, valid, words_ptr, raw_ptr,
                                                  step_lut_ptr, sym_lut_ptr, sym_info_ptr, n_words, n_raw_words, PB,
                                                  WIDTH, CODE, NSYM)
        dst = out_ptr + _offset(_wide(row, OFF64) * in_f + col)
        if WIDTH == 16:
            tl.store(dst, wbits.to(tl.uint16).to(tl.int16, bitcast=True), mask=valid)
        else:
            tl.store(dst, wbits.to(tl.int32, bitcast=True), mask=valid)
        row, col, c, s, valid = row_n, col_n, c_n, s_n, valid_n
    if CHECK:
        tl.store(final_ptr + lanes, x.to(tl.int64), mask=lane_ok)
        tl.store(final_ptr + n_lanes + lanes, wptr.to(tl.int64), mask=lane_ok)
        tl.store(final_ptr + 2 * n_lanes + lanes, rpos.to(tl.int64), mask=lane_ok)


@triton.jit
def _fused_gemv_kernel(
    x_ptr, y_ptr,
    qweight_ptr, scales_ptr, zeros_ptr, words_ptr, raw_ptr, lane_state_ptr, word_start_ptr, raw_start_ptr,
    step_lut_ptr, sym_lut_ptr, sym_info_ptr,
    M, x_stride, out_f, in_f, n_lanes, steps, d_row, d_col, q_stride, s_stride, z_stride, n_words, n_raw_words,
    G: tl.constexpr, PB: tl.constexpr, WIDTH: tl.constexpr, CODE: tl.constexpr, XCODE: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr, NSYM: tl.constexpr, OFF64: tl.constexpr,
):
    lanes, lane_ok, x, word, wptr, rpos, row, col = _lane_setup(
        lane_state_ptr, word_start_ptr, raw_start_ptr, words_ptr, n_lanes, in_f, n_words, BLOCK_L)
    c, s, valid = _element(qweight_ptr, scales_ptr, zeros_ptr, row, col, lane_ok, out_f, q_stride, s_stride,
                           z_stride, G, OFF64)
    m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = m < M
    r_idx = tl.arange(0, ROWS)
    for _ in range(steps):
        row_n, col_n, c_n, s_n, valid_n = _next_element(qweight_ptr, scales_ptr, zeros_ptr, row, col, d_row, d_col,
                                                        lane_ok, out_f, in_f, q_stride, s_stride, z_stride, G,
                                                        OFF64)
        xv = tl.load(x_ptr + _wide(m, OFF64)[:, None] * x_stride + col[None, :],
                     mask=m_ok[:, None] & valid[None, :], other=0.0).to(tl.float32)
        x, word, wptr, rpos, wbits = _decode_step(x, word, wptr, rpos, c, s, valid, words_ptr, raw_ptr,
                                                  step_lut_ptr, sym_lut_ptr, sym_info_ptr, n_words, n_raw_words, PB,
                                                  WIDTH, CODE, NSYM)
        w = _f32_from_bits(wbits, CODE)
        if XCODE != CODE:  # the weight in x's dtype, as F.linear(x, W.to(x.dtype)) sees it
            w = _f32_from_bits(_bits_from_f32(w, XCODE), XCODE)
        prod = tl.where(valid[None, :], xv * w[None, :], 0.0)  # [BLOCK_M, BLOCK_L]
        # Segmented sum per output row: the block's elements are consecutive, so they span the rows
        # first_row .. first_row + ROWS - 1. A `where`, not a one-hot product: inf * 0 is NaN.
        first_row = tl.min(tl.where(valid, row, 2147483647), axis=0)
        rel = row - first_row
        sel = (rel[:, None] == r_idx[None, :]) & valid[:, None]  # [BLOCK_L, ROWS]
        part = tl.sum(tl.where(sel[None, :, :], prod[:, :, None], 0.0), axis=1)  # [BLOCK_M, ROWS]
        used = tl.max(tl.where(valid, rel, -1), axis=0)
        dst = y_ptr + _wide(m, OFF64)[:, None] * out_f + first_row + r_idx[None, :]
        tl.atomic_add(dst, part, mask=m_ok[:, None] & (r_idx[None, :] <= used), sem="relaxed")
        row, col, c, s, valid = row_n, col_n, c_n, s_n, valid_n


# ============================================================================ launchers
def _lane_args(pw: PackedWeight) -> tuple:
    """Tensor and scalar arguments shared by the decode kernels."""
    out_f, in_f = pw.shape
    # The fused form has no third table: sym_lut stands in for the unread sym_info pointer.
    tables = (pw.slot_sym, pw.sym_step, pw.sym_info) if pw.split_tables else (pw.step_lut, pw.sym_lut, pw.sym_lut)
    return (
        (pw.qweight, pw.scales, pw.zeros, pw.words, pw.raw, pw.lane_state, pw.word_start, pw.raw_start, *tables),
        (out_f, in_f, pw.n_lanes, pw.steps, pw.n_lanes // in_f, pw.n_lanes % in_f,
         pw.qweight.stride(0), pw.scales.stride(0), pw.zeros.stride(0), pw.words.numel(), pw.raw.numel()),
    )


def _needs_off64(pw: PackedWeight, *tensors: torch.Tensor) -> bool:
    """Whether an element offset can pass 2**31 (the decode kernels' ``OFF64``): int32 offsets save
    the 64-bit address arithmetic of every load and store of every step."""
    sizes = (pw.numel, pw.qweight.numel(), pw.scales.numel(), pw.zeros.numel(), *(t.numel() for t in tensors))
    return max(sizes) >= 2**31


def _nsym(pw: PackedWeight) -> int:
    """The decode kernels' ``NSYM``: 0 for the fused tables, else the split tables' alphabet size."""
    return pw.sym_info.numel() if pw.split_tables else 0


def _check_final(pw: PackedWeight, final: torch.Tensor) -> None:
    x, wptr, rpos = final.view(3, pw.n_lanes)
    ok = bool((x == 1 << 16).all()) and torch.equal(wptr, pw.word_start[1:].to(torch.int64)) and torch.equal(
        rpos, pw.raw_start[1:].to(torch.int64))
    if not ok:
        raise TpdeFormatError(pw.name, "delta stream failed its lane check (corrupt or truncated delta)")


def reconstruct(pw: PackedWeight, out: torch.Tensor | None = None, check: bool = False) -> torch.Tensor:
    """The exact weight (one launch). ``check`` verifies every lane's end state (one device sync)."""
    pw.require_delta()
    if out is None:
        out = torch.empty(pw.shape, dtype=pw.dtype, device=pw.device)
    _check_out(pw, out)
    tensors, scalars = _lane_args(pw)
    final = torch.empty(3 * pw.n_lanes if check else 1, dtype=torch.int64, device=pw.device)
    grid = (triton.cdiv(pw.n_lanes, BLOCK_LANES),)
    _reconstruct_kernel[grid](
        *tensors, out.view(INT_VIEW[pw.dtype]), final, *scalars,
        G=pw.group_size, PB=pw.prob_bits, WIDTH=pw.width, CODE=DTYPE_CODES[pw.dtype],
        BLOCK_L=BLOCK_LANES, CHECK=check, NSYM=_nsym(pw), OFF64=_needs_off64(pw), num_warps=BLOCK_LANES // 32,
    )
    if check:
        _check_final(pw, final)
    return out


def fused_linear(x2: torch.Tensor, pw: PackedWeight, block_lanes: int = FUSED_BLOCK_LANES) -> torch.Tensor:
    """``x2[M, in] @ W.T`` in float32 (no bias, not rounded), ``W`` decoded in registers only.
    ``block_lanes`` (a power of two, 32 or more) is set by the benchmark's sweep."""
    pw.require_delta()
    out_f, in_f = pw.shape
    m = x2.shape[0]
    y = torch.zeros((m, out_f), dtype=torch.float32, device=pw.device)
    if m == 0:
        return y
    tensors, scalars = _lane_args(pw)
    rows = triton.next_power_of_2((block_lanes - 1) // in_f + 2)  # rows a block of elements can span
    block_m = min(FUSED_BLOCK_M, triton.next_power_of_2(m))
    grid = (triton.cdiv(pw.n_lanes, block_lanes), triton.cdiv(m, block_m))
    _fused_gemv_kernel[grid](
        x2, y, *tensors, m, x2.stride(0), *scalars,
        G=pw.group_size, PB=pw.prob_bits, WIDTH=pw.width, CODE=DTYPE_CODES[pw.dtype], XCODE=DTYPE_CODES[x2.dtype],
        BLOCK_L=block_lanes, BLOCK_M=block_m, ROWS=rows, NSYM=_nsym(pw), OFF64=_needs_off64(pw, x2, y),
        num_warps=block_lanes // 32,
    )
    return y


