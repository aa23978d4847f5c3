"""The base-only 4-bit kernels and their launchers: the base weight, and the 4-bit matmul of ``mode="base"``.

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

Example::

    from tpde_hf.triton_kernels.base_kernels import base_linear
    y = base_linear(x2, packed_weight, bias)  # x2: [M, in] on the GPU
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tpde_hf.codec.ordinal import DTYPE_CODES, INT_VIEW
from tpde_hf.triton_kernels.device_common import (
    _BF16,
    _FP16,
    _FP32,
    _HW_BF16_ROUND,
    _bits_from_f32,
    _check_out,
    _f32_from_bits,
    _level_scale,
    interpreting,
)
from tpde_hf.triton_kernels.packed import PackedWeight

#: Base-matmul launch defaults by activation dtype: ``(block_n, block_k_bytes)``, weight rows per
#: program and 4-bit bytes per K step. The fewest SASS instructions per weight without register spills
#: on sm_90 (Triton 3.9; ``benchmarks/sass_counts.py``): 5.7 per weight for 16-bit activations at
#: 128 x 32 (the byte-wise kernel before it took 8.8 at its best, 64 x 16). float32 activations use the
#: exact float32 dot, whose registers allow only 32 x 16.
BASE_BLOCKS = {torch.bfloat16: (128, 32), torch.float16: (128, 32), torch.float32: (32, 16)}


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
