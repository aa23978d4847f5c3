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

**Base-only 4-bit matmul** is a tiled ``tl.dot`` GEMM that dequantizes the weight tile per K step,
rounding ``P`` to the source dtype exactly as ``base_weight`` does. A K step reads ``KB`` bytes per
weight row as int32 words; each word's eight nibbles become eight tiles that ``tl.join`` puts back in
column order inside the thread that loaded the word, so ``x`` is read as it lies. ``P`` is one exact
FMA, ``q * s + (-zero * s)`` (every term fits float32's 24 bits), then one rounding. A K step stays
inside one group, so a row's scale and zero are loaded once per group. Codes past ``in`` are the
zero point (``P = 0``); they are masked too when the last group is partial (``K_TAIL``), so that a
crafted file cannot make ``inf * 0``. At batch 1 a ``[16, 128]`` tile grid alone has
``out / 128`` programs (32 for 4096 rows): too few loads in flight to stream 4-bit weights at memory
speed. So the groups of a tile are split over ``SPLIT`` programs (``BASE_PROGRAMS_PER_SM`` per SM in
all); each stores a float32 partial, and the last to finish, counted with an atomic ticket, adds
the partials in split order and writes ``y``: deterministic, one launch, and the ticket is reset for
the next launch on the stream. Above ``BASE_FUSED_MAX_ROWS`` rows it dequantizes once and calls
cuBLAS instead.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tpde_hf.codec.ordinal import DTYPE_CODES, INT_VIEW
from tpde_hf.errors import TpdeFormatError
from tpde_hf.triton_kernels.packed import IDENTITY_CONTEXT, SYM_HI_BITS, PackedWeight

# Constants the kernels read (Triton wants module globals as constexpr).
_BF16: tl.constexpr = tl.constexpr(DTYPE_CODES[torch.bfloat16])
_FP16: tl.constexpr = tl.constexpr(DTYPE_CODES[torch.float16])
_FP32: tl.constexpr = tl.constexpr(DTYPE_CODES[torch.float32])
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
#: Base-matmul launch defaults by activation dtype: ``(block_n, block_k_bytes)``, weight rows per
#: program and 4-bit bytes per K step. The fewest SASS instructions per weight without register spills
#: on sm_90 (Triton 3.9; ``benchmarks/sass_counts.py``): 5.7 per weight for 16-bit activations at
#: 128 x 32 (the byte-wise kernel before it took 8.8 at its best, 64 x 16). float32 activations use the
#: exact float32 dot, whose registers allow only 32 x 16.
BASE_BLOCKS = {torch.bfloat16: (128, 32), torch.float16: (128, 32), torch.float32: (32, 16)}


def interpreting() -> bool:
    return bool(triton.knobs.runtime.interpret)


#: Round float32 -> bfloat16 with the hardware conversion (``cvt.rn``: IEEE round-to-nearest-even,
#: the rounding torch uses) when compiled; the interpreter truncates, so there it is written out in
#: integer arithmetic (about 8 instructions per element). Fixed at import, like the JIT mode itself.
#: ``test_triton_prediction_rounding_on_every_fp16_scale`` checks every prediction on either path.
_HW_BF16_ROUND: tl.constexpr = tl.constexpr(not interpreting())


# ============================================================================ device helpers
@triton.jit
def _bits_from_f32(v, CODE: tl.constexpr):
    """Round float32 ``v`` to the dtype ``CODE``; its bit pattern as uint32.

    bfloat16 rounds to nearest even: the hardware's conversion when compiled (a NaN may come out
    with another payload than torch's 0x7FC0: only matmul outputs can be NaN, and those are compared
    as NaN), integer arithmetic under the interpreter (NaN -> 0x7FC0, as torch does).
    """
    if CODE == _BF16:
        if _HW_BF16_ROUND:
            return v.to(tl.bfloat16).to(tl.uint16, bitcast=True).to(tl.uint32)
        else:
            b = v.to(tl.uint32, bitcast=True)
            return tl.where(v != v, 0x7FC0, (b + 0x7FFF + ((b >> 16) & 1)) >> 16)
    elif CODE == _FP16:
        return v.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
    else:
        return v.to(tl.uint32, bitcast=True)


@triton.jit
def _f32_from_bits(b, CODE: tl.constexpr):
    """Bit pattern (uint32) of dtype ``CODE`` -> its exact float32 value."""
    if CODE == _BF16:
        return (b << 16).to(tl.float32, bitcast=True)
    elif CODE == _FP16:
        return b.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    else:
        return b.to(tl.float32, bitcast=True)


@triton.jit
def _level_scale(qweight_ptr, scales_ptr, zeros_ptr, row64, col, mask, q_stride, s_stride, z_stride,
                 G: tl.constexpr):
    """``(c = q - zero, scale as float32)`` of the elements at ``(row, col)`` (nibbles low first)."""
    qb = tl.load(qweight_ptr + _offset(row64 * q_stride + (col >> 1)), mask=mask, other=0).to(tl.int32)
    g = (col.to(tl.uint32) // G).to(tl.int32)  # col >= 0: a shift, without a signed division's fix-ups
    zb = tl.load(zeros_ptr + _offset(row64 * z_stride + (g >> 1)), mask=mask, other=0).to(tl.int32)
    s = tl.load(scales_ptr + _offset(row64 * s_stride + g), mask=mask, other=0.0).to(tl.float32)
    return ((qb >> ((col & 1) * 4)) & 15) - ((zb >> ((g & 1) * 4)) & 15), s


@triton.jit
def _offset(v):
    """A non-negative element offset as the pointer arithmetic should see it: int32 ones as uint32,
    which the compiler zero-extends once, where it spreads a signed one's extension over each term."""
    if v.dtype == tl.int32:
        return v.to(tl.uint32, bitcast=True)
    else:
        return v


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


@triton.jit
def _base_weight_kernel(
    qweight_ptr, scales_ptr, zeros_ptr, out_ptr, out_f, in_f, q_stride, s_stride, z_stride,
    G: tl.constexpr, CODE: tl.constexpr, WIDTH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (rows[:, None] < out_f) & (cols[None, :] < in_f)
    row64 = rows[:, None].to(tl.int64)
    c, s = _level_scale(qweight_ptr, scales_ptr, zeros_ptr, row64, cols[None, :], mask, q_stride, s_stride,
                        z_stride, G)
    bits = _bits_from_f32(c.to(tl.float32) * s, CODE)
    dst = out_ptr + row64 * in_f + cols[None, :]
    if WIDTH == 16:
        tl.store(dst, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(dst, bits.to(tl.int32, bitcast=True), mask=mask)


@triton.jit
def _base_matmul_kernel(
    x_ptr, y_ptr, bias_ptr, qweight_ptr, scales_ptr, zeros_ptr, part_ptr, ticket_ptr,
    M, N, K, x_stride, q_stride, s_stride, z_stride, groups_per_split,
    G: tl.constexpr, CODE: tl.constexpr, XCODE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KB: tl.constexpr, DOT_F32: tl.constexpr, SPLIT: tl.constexpr,
    K_TAIL: tl.constexpr,
):
    """``y[M, N] = x[M, K] @ P[N, K].T (+ bias)``; K steps of ``KB`` bytes inside each group.

    Program ``(m, n, k)`` covers groups ``k * groups_per_split ..`` of one ``[BLOCK_M, BLOCK_N]``
    tile. Its weight tile is read as int32 words (eight columns each) and rebuilt in column order in
    the thread that loaded it, so x is read contiguously and in natural order. With ``SPLIT > 1`` each
    program stores its float32 partial sum and takes a ticket; the last of a tile's ``SPLIT``
    programs adds the partials in split order (deterministic), writes ``y`` and resets the ticket.
    """
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = rm < M, rn < N
    rm64, rn64 = rm.to(tl.int64), rn.to(tl.int64)
    KW: tl.constexpr = KB // 4  # int32 words of a K step, 8 columns each (nibble i = column 8 * word + i)
    # Decode batches (BLOCK_M = 16) put the weight on the left of the dot (acc = W @ x.T, transposed
    # once at the end): the tensor cores then reuse x's fragments with no register moves (5.7 SASS
    # instructions per weight instead of 5.9); for prefill tiles x on the left is the cheaper (5.7 vs 6.1).
    W_LEFT: tl.constexpr = BLOCK_M <= 16
    acc = tl.zeros((BLOCK_N, BLOCK_M) if W_LEFT else (BLOCK_M, BLOCK_N), dtype=tl.float32)
    g_end = tl.minimum(pid_k * groups_per_split + groups_per_split, tl.cdiv(K, G))
    for g in range(pid_k * groups_per_split, g_end):
        zb = tl.load(zeros_ptr + rn64 * z_stride + (g >> 1), mask=n_ok, other=0).to(tl.int32)
        s = tl.load(scales_ptr + rn64 * s_stride + g, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        zs = -((zb >> ((g & 1) * 4)) & 15).to(tl.float32)[:, None] * s
        for j in tl.static_range(G // 8 // KW):
            word = g * (G // 8) + j * KW + tl.arange(0, KW)
            qw = tl.load(qweight_ptr + rn64[:, None] * q_stride + word[None, :], mask=n_ok[:, None], other=0)
            w = _word_tile(qw.to(tl.uint32, bitcast=True), zs, s, BLOCK_N, KW, CODE, XCODE)
            cols = g * G + j * 8 * KW + tl.arange(0, 8 * KW)
            if K_TAIL:  # padding codes are the zero point (P = 0): masked anyway, against a crafted file
                w = tl.where((cols < K)[None, :], w, 0.0)
            xt = tl.load(x_ptr + rm64[:, None] * x_stride + cols[None, :], mask=m_ok[:, None] & (cols < K)[None, :],
                         other=0.0)
            if DOT_F32:  # fp32 sources, and the interpreter (its dot cannot read bfloat16)
                xt, w = xt.to(tl.float32), w.to(tl.float32)
            else:
                w = w.to(xt.dtype)
            if W_LEFT:
                acc += tl.dot(w, tl.trans(xt), input_precision="ieee" if DOT_F32 else None)
            else:
                acc += tl.dot(xt, tl.trans(w), input_precision="ieee" if DOT_F32 else None)
    if W_LEFT:
        acc = tl.trans(acc)
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT > 1:
        tile = pid_m * tl.num_programs(1) + pid_n
        part = part_ptr + (pid_k * M + rm64[:, None]) * N + rn64[None, :]
        tl.store(part, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken
        ticket = tl.atomic_add(ticket_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if ticket == SPLIT - 1:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k in range(SPLIT):  # fixed order: the same sum on every run
                acc += tl.load(part_ptr + (k * M + rm64[:, None]) * N + rn64[None, :], mask=mask, other=0.0,
                               cache_modifier=".cg")
            _store_base_output(acc, y_ptr, bias_ptr, rm64, rn, n_ok, mask, N, XCODE, HAS_BIAS)
            tl.atomic_xchg(ticket_ptr + tile, 0, sem="relaxed", scope="gpu")  # ready for the next launch
    else:
        _store_base_output(acc, y_ptr, bias_ptr, rm64, rn, n_ok, mask, N, XCODE, HAS_BIAS)


@triton.jit
def _word_tile(qw, zs, s, BLOCK_N: tl.constexpr, KW: tl.constexpr, CODE: tl.constexpr, XCODE: tl.constexpr):
    """Words ``[BLOCK_N, KW]`` -> weights ``[BLOCK_N, 8 * KW]`` in column order (nibble i = column 8w + i).

    Each nibble is its own tile; joins nest so that the last join picks bit 0 of the nibble index
    (``tl.join`` adds a minor dimension), which keeps all eight in the thread that loaded the word."""
    p0 = _base_tile(qw & 15, zs, s, CODE, XCODE)
    p1 = _base_tile((qw >> 4) & 15, zs, s, CODE, XCODE)
    p2 = _base_tile((qw >> 8) & 15, zs, s, CODE, XCODE)
    p3 = _base_tile((qw >> 12) & 15, zs, s, CODE, XCODE)
    p4 = _base_tile((qw >> 16) & 15, zs, s, CODE, XCODE)
    p5 = _base_tile((qw >> 20) & 15, zs, s, CODE, XCODE)
    p6 = _base_tile((qw >> 24) & 15, zs, s, CODE, XCODE)
    p7 = _base_tile(qw >> 28, zs, s, CODE, XCODE)
    w = tl.join(tl.join(tl.join(p0, p4), tl.join(p2, p6)), tl.join(tl.join(p1, p5), tl.join(p3, p7)))
    return tl.reshape(w, (BLOCK_N, 8 * KW))


@triton.jit
def _base_tile(q, zs, s, CODE: tl.constexpr, XCODE: tl.constexpr):
    """Levels ``q`` -> ``P = (q - zero) * s`` rounded to the source dtype, then to x's dtype.

    ``zs = -zero * s``. ``q * s + zs`` in one fused multiply-add is exact in float32: both products and
    their sum need at most 15 significant bits. When x has the source's 16-bit dtype one conversion to
    it is the whole rounding (the interpreter's bfloat16 conversion truncates: it takes the other path).
    """
    p = tl.fma(q.to(tl.float32), s, zs)
    if XCODE == CODE and (CODE == _FP16 or (CODE == _BF16 and _HW_BF16_ROUND)):
        w = p.to(tl.float16 if CODE == _FP16 else tl.bfloat16)
    else:
        w = _f32_from_bits(_bits_from_f32(p, CODE), CODE)
        if XCODE != CODE:
            w = _f32_from_bits(_bits_from_f32(w, XCODE), XCODE)
    return w


@triton.jit
def _store_base_output(acc, y_ptr, bias_ptr, rm64, rn, n_ok, mask, N, XCODE: tl.constexpr,
                       HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    bits = _bits_from_f32(acc, XCODE)
    dst = y_ptr + rm64[:, None] * N + rn[None, :]
    if XCODE == _FP32:
        tl.store(dst, bits.to(tl.int32, bitcast=True), mask=mask)
    else:
        tl.store(dst, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)


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


def base_weight(pw: PackedWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    out_f, in_f = pw.shape
    if out is None:
        out = torch.empty(pw.shape, dtype=pw.dtype, device=pw.device)
    _check_out(pw, out)
    # The interpreter's cost is per program, not per element: big tiles there.
    block_r, block_c = (256, 1024) if interpreting() else (16, 128)
    grid = (triton.cdiv(out_f, block_r), triton.cdiv(in_f, block_c))
    _base_weight_kernel[grid](
        pw.qweight, pw.scales, pw.zeros, out.view(INT_VIEW[pw.dtype]), out_f, in_f,
        pw.qweight.stride(0), pw.scales.stride(0), pw.zeros.stride(0),
        G=pw.group_size, CODE=DTYPE_CODES[pw.dtype], WIDTH=pw.width, BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return out


def base_linear(x2: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None, split: int | None = None,
                block_n: int | None = None, block_k_bytes: int | None = None) -> torch.Tensor:
    """``x2[M, in] @ P.T + bias`` in x's dtype, dequantizing 4-bit tiles on the fly.

    ``split`` (the programs that share a tile's groups) defaults to what fills the GPU; it, ``block_n``
    (weight rows per program) and ``block_k_bytes`` (4-bit bytes per K step, a multiple of 4) default
    to :data:`BASE_BLOCKS` and are set by the benchmark's sweep and the tests.
    """
    out_f, in_f = pw.shape
    m = x2.shape[0]
    y = torch.empty((m, out_f), dtype=x2.dtype, device=x2.device)
    if m == 0:
        return y
    default_n, default_kb = BASE_BLOCKS[x2.dtype]
    block_n, block_k_bytes = block_n or default_n, min(block_k_bytes or default_kb, pw.group_size // 2)
    if block_k_bytes % 4:
        raise ValueError(f"block_k_bytes must be a multiple of 4 (whole int32 words), got {block_k_bytes}")
    block_m = 16 if m <= 16 else 64
    tiles = (triton.cdiv(m, block_m), triton.cdiv(out_f, block_n))
    n_groups = triton.cdiv(in_f, pw.group_size)
    split = min(split or _base_split(tiles[0] * tiles[1], n_groups, x2.device), n_groups)
    groups_per_split = triton.cdiv(n_groups, split)
    split = triton.cdiv(n_groups, groups_per_split)  # no program without a group
    part = torch.empty((split, m, out_f) if split > 1 else (1,), dtype=torch.float32, device=x2.device)
    tickets = _tickets(x2.device, tiles[0] * tiles[1]) if split > 1 else part
    words = pw.qweight.view(torch.int32)  # [out, in_pad / 8]; PackedWeight keeps it 4-byte aligned
    _base_matmul_kernel[(*tiles, split)](
        x2, y.view(INT_VIEW[x2.dtype]), bias if bias is not None else y, words, pw.scales, pw.zeros, part,
        tickets, m, out_f, in_f, x2.stride(0), words.stride(0), pw.scales.stride(0), pw.zeros.stride(0),
        groups_per_split,
        G=pw.group_size, CODE=DTYPE_CODES[pw.dtype], XCODE=DTYPE_CODES[x2.dtype], HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, KB=block_k_bytes, DOT_F32=interpreting() or x2.dtype == torch.float32,
        SPLIT=split, K_TAIL=in_f % pw.group_size != 0,
    )
    return y


#: Programs per multiprocessor the split-K base matmul aims for: a GEMV has too few output tiles to
#: keep enough 4-bit weight loads in flight to stream it at memory speed.
BASE_PROGRAMS_PER_SM = 4
#: Fewest quantization groups one split covers (each split adds a float32 partial write and read).
BASE_MIN_GROUPS_PER_SPLIT = 2


def _base_split(tiles: int, n_groups: int, device: torch.device) -> int:
    if device.type != "cuda":  # the interpreter: its cost is per program
        return 1
    target = BASE_PROGRAMS_PER_SM * _sm_count(device)
    return max(1, min(-(-target // tiles), n_groups // BASE_MIN_GROUPS_PER_SPLIT))


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


_TICKETS: dict[tuple[str, int], torch.Tensor] = {}


def _tickets(device: torch.device, n: int) -> torch.Tensor:
    """Zeroed int32 tile counters of the split-K epilogue, one buffer per device and stream (the last
    program of a tile resets its counter, so kernels on one stream, which run in order, share it)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _TICKETS.get(key)
    if buf is None or buf.numel() < n:
        buf = _TICKETS[key] = torch.zeros(max(n, 4096), dtype=torch.int32, device=device)
    return buf


def _check_out(pw: PackedWeight, out: torch.Tensor) -> None:
    if out.shape != pw.shape or out.dtype != pw.dtype or not out.is_contiguous() or out.device != pw.device:
        raise ValueError(f"out must be a contiguous {pw.dtype} tensor of shape {list(pw.shape)} on {pw.device}")


