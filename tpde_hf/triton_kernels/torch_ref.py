"""Torch fallbacks: the kernels' math, vectorized over lanes, for the CPU and for GPUs without Triton.

Each function here is the reference its Triton twin is tested against, and reads the same
:class:`PackedWeight` tensors. The rANS loop runs step by step over all lanes at once: step ``e`` of
every lane covers the contiguous elements ``[e * n_lanes, (e + 1) * n_lanes)``, so the whole decode
is ``steps`` vector operations (1024 at the default lane length) plus element-wise post-processing.

On the CPU the step loop runs in numpy over the tensors' shared memory (numpy's per-call overhead
is a fraction of torch's at these sizes); elsewhere it runs in torch on the weight's device.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from tpde_hf.codec import bitpack, rans
from tpde_hf.codec.rans import STATE_LOW, WORD_BITS
from tpde_hf.errors import TpdeFormatError
from tpde_hf.triton_kernels.packed import IDENTITY_CONTEXT, SYM_HI_BITS, PackedWeight


def _grouped_levels(pw: PackedWeight) -> torch.Tensor:
    """``c = q - zero`` as int16 ``[out, n_groups, G]`` (padding columns included): broadcasting the
    zero points over their group instead of repeating them."""
    out_f = pw.shape[0]
    ng = pw.scales.shape[1]
    q = torch.stack((pw.qweight & 0x0F, pw.qweight >> 4), dim=-1).view(out_f, ng, pw.group_size)
    z = torch.stack((pw.zeros & 0x0F, pw.zeros >> 4), dim=-1).view(out_f, -1)[:, :ng]
    return q.to(torch.int16) - z.to(torch.int16).unsqueeze(-1)


def levels(pw: PackedWeight) -> torch.Tensor:
    """``c = q - zero`` (int16 ``[out, in]``): the delta's context and the base's level."""
    return _grouped_levels(pw).flatten(1)[:, : pw.shape[1]]


def base_weight(pw: PackedWeight, grouped_levels: torch.Tensor | None = None) -> torch.Tensor:
    """The 4-bit prediction ``P = dtype(float32(c) * float32(scale))`` (``== enc.base_weight()``).

    The float32 product is exact (|c| <= 15 times an fp16 scale), so the cast is the only rounding.
    """
    c = _grouped_levels(pw) if grouped_levels is None else grouped_levels
    p = (c.to(torch.float32) * pw.scales.to(torch.float32).unsqueeze(-1)).to(pw.dtype)
    return p.flatten(1)[:, : pw.shape[1]]


def reconstruct(pw: PackedWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """The exact weight; raises :class:`TpdeFormatError` when a lane fails its end-of-stream check.

    Example: ``torch.equal(reconstruct(pw).view(torch.int16), decode_tensor(enc).view(torch.int16))``.
    """
    pw.require_delta()
    if pw.delta_code == "class-width":
        return _reconstruct_class_width(pw, out)
    grouped = _grouped_levels(pw)
    lut_index = _rans_lut_index(pw, grouped.flatten(1)[:, : pw.shape[1]].abs().flatten())
    info = pw.sym_lut[lut_index].to(torch.int32)  # [steps, lanes]
    nraw = info >> SYM_HI_BITS
    raw_start = pw.raw_start.to(torch.int64)
    if not torch.equal(nraw.sum(dim=0), raw_start[1:] - raw_start[:-1]):
        raise TpdeFormatError(pw.name, "raw-bit stream does not match the decoded symbols (corrupt delta)")
    offsets = torch.cumsum(nraw, 0, dtype=torch.int64).sub_(nraw).add_(raw_start[:-1]).flatten()
    nraw = nraw.flatten()
    # Narrow integers where the width allows: this part streams over every element.
    acc = torch.int32 if pw.width == 16 else torch.int64
    u = (info.flatten() & ((1 << SYM_HI_BITS) - 1)).to(acc) << nraw.to(acc)
    has = nraw.nonzero().squeeze(1)  # most elements have no raw bits: read only the others
    raw = bitpack.read_fields(pw.raw.to(torch.int64) & 0xFFFFFFFF, nraw[has].to(torch.int64), offsets[has])
    u[has] |= raw.to(acc)
    u = u[: pw.numel]
    w = _add_to_ordinal(base_weight(pw, grouped).flatten(), (u >> 1) ^ -(u & 1), pw.width).view(pw.shape)
    if out is None:
        return w
    out.copy_(w)
    return out


def _reconstruct_class_width(pw: PackedWeight, out: torch.Tensor | None) -> torch.Tensor:
    """The class-width reference decoder (:func:`tpde_hf.codec.class_width.decode`, on the CPU)."""
    from tpde_hf.codec import base_quant, class_width
    from tpde_hf.codec.encoded import named_errors

    code, base = pw.class_width_parts()
    if pw.device.type != "cpu":
        code = dataclasses.replace(code, header=code.header.cpu(), offsets=code.offsets.cpu(), words=code.words.cpu())
        base = base_quant.BaseTensors(base.qweight.cpu(), base.scales.cpu(), base.zeros.cpu())
    with named_errors(pw.name):
        w = class_width.decode(code, base).to(pw.device)
    if out is None:
        return w
    out.copy_(w)
    return out


def _add_to_ordinal(pred: torch.Tensor, r: torch.Tensor, width: int) -> torch.Tensor:
    """``ord^-1(ord(pred) + r)`` modulo ``2**width`` (the codec's ``ordinal`` map, in narrow integers).

    ``ord`` flips the magnitude bits of negative patterns, an involution; the integer cast wraps.
    """
    bits_t = torch.int16 if width == 16 else torch.int32
    mag = (1 << (width - 1)) - 1
    v = pred.view(bits_t).to(r.dtype)
    o = ((v ^ ((v >> (width - 1)) & mag)) + r).to(bits_t)
    return (o ^ ((o >> (width - 1)) & mag)).view(pred.dtype)


def lossless_linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W)``: on this path it is bit-identical to the dense model."""
    return F.linear(x, reconstruct(pw).to(x.dtype), bias)


def base_linear(x: torch.Tensor, pw: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, P)`` with the lossy 4-bit weight."""
    return F.linear(x, base_weight(pw).to(x.dtype), bias)


# ---------------------------------------------------------------------------- the rANS loop
def _rans_lut_index(pw: PackedWeight, ctx: torch.Tensor, loop: str | None = None) -> torch.Tensor:
    """Run every lane; returns the table index ``ctx << pb | slot`` of every step, ``[steps, lanes]`` int32.

    Padding (past ``numel``) uses the identity context. Checks each lane's end state and word count.
    ``loop`` ("numpy" or "torch") overrides the choice by device (for tests).
    """
    pb, steps, n_lanes = pw.prob_bits, pw.steps, pw.n_lanes
    ctx_m = torch.full((steps * n_lanes,), IDENTITY_CONTEXT << pb, dtype=torch.int32, device=ctx.device)
    torch.bitwise_left_shift(ctx.to(torch.int32), pb, out=ctx_m[: ctx.numel()])
    ctx_m = ctx_m.view(steps, n_lanes)
    start = pw.word_start.to(torch.int64)
    if (loop or ("numpy" if pw.device.type == "cpu" else "torch")) == "numpy":
        index, x, ptr = _loop_numpy(pw, ctx_m.numpy().view(np.uint32), start)
    else:
        index, x, ptr = _loop_torch(pw, ctx_m, start)
    if not bool((x == STATE_LOW).all()) or not torch.equal(ptr, start[1:]):
        raise TpdeFormatError(pw.name, "delta stream failed its lane check (corrupt or truncated delta)")
    return index


def _loop_numpy(pw: PackedWeight, ctx_base: np.ndarray, start: torch.Tensor):
    """The codec's own numpy decode loop (:func:`rans.decode_lanes`) over this weight's streams."""
    words = torch.cat((pw.words.to(torch.int64) & 0xFFFF, torch.zeros(1, dtype=torch.int64)))  # + clamp target
    index, x, ptr = rans.decode_lanes(ctx_base, pw.lane_state.to(torch.int64) & 0xFFFFFFFF, start[:-1], words,
                                      pw.step_lut.numpy().view(np.uint32), pw.prob_bits)
    return torch.from_numpy(index.view(np.int32)), x, ptr


def _loop_torch(pw: PackedWeight, ctx_base: torch.Tensor, start: torch.Tensor):
    dev = ctx_base.device
    mask = (1 << pw.prob_bits) - 1
    lut = pw.step_lut.to(torch.int64)
    words = torch.cat((pw.words.to(torch.int64) & 0xFFFF, torch.zeros(1, dtype=torch.int64, device=dev)))
    last = words.numel() - 1
    x = pw.lane_state.to(torch.int64) & 0xFFFFFFFF
    ptr = start[:-1].clone()
    out = torch.empty(ctx_base.shape, dtype=torch.int64, device=dev)
    for e in range(ctx_base.shape[0]):
        idx = torch.bitwise_and(x, mask, out=out[e]).add_(ctx_base[e])
        p = lut[idx]
        x = (x >> pw.prob_bits) * (p & 0xFFFF) + (p >> 16)
        need = x < STATE_LOW
        x = torch.where(need, (x << WORD_BITS) | words[ptr.clamp(max=last)], x)
        ptr += need
    return out.to(torch.int32), x, ptr
