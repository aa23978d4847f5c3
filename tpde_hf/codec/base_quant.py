"""The 4-bit base: asymmetric group-wise round-to-nearest, packed two codes per byte.

Layout for a weight of shape ``[out, in]`` and group size ``G``:

* ``qweight``: uint8 ``[out, ceil(in/G)*G/2]``; byte ``k`` of a row holds column ``2k`` in its low
  nibble and column ``2k+1`` in its high nibble. Columns past ``in`` are padding (code = zero).
* ``scales``: float16 ``[out, n_groups]``.
* ``zeros``: uint8 ``[out, ceil(n_groups/2)]``, 4-bit zero points packed like ``qweight``.

The prediction is ``P = dtype((q - zero) * scale)`` computed in float32. ``|q - zero| <= 15`` times
an fp16 scale needs at most 15 significant bits, so the float32 product is exact and only the
final cast rounds (round-to-nearest-even): CPU, Triton interpreter and GPU agree bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUPPORTED_GROUP_SIZES = (32, 64, 128)
FP16_MAX = 65504.0
FP16_MIN_SUBNORMAL = 2.0**-24


@dataclass(frozen=True)
class BaseTensors:
    """The packed 4-bit base of one weight."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor


def n_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """Pack uint8 codes in [0, 15] along the last dim (padded to even length) two per byte."""
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, length: int) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`, returning ``length`` codes along the last dim (uint8)."""
    out = torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)
    return out[..., :length]


def quantize(weight: torch.Tensor, group_size: int = 128) -> BaseTensors:
    """Quantize a 2-D weight to the packed 4-bit base.

    Non-finite entries are ignored for the group range and get the code ``zero`` (prediction 0):
    the lossless delta carries them. Example::

        base = quantize(torch.randn(8, 100, dtype=torch.bfloat16), group_size=32)
        base.qweight.shape  # (8, 64): 128 padded columns, two per byte
    """
    out_f, in_f = weight.shape
    ng = n_groups(in_f, group_size)
    w = weight.to(torch.float32)
    w = torch.nn.functional.pad(w, (0, ng * group_size - in_f)).view(out_f, ng, group_size)
    finite = torch.isfinite(w)
    wf = torch.where(finite, w, torch.zeros((), dtype=w.dtype))
    # The range always contains 0 so that the zero point is a valid 4-bit code.
    lo = wf.amin(dim=-1).clamp(max=0.0)
    hi = wf.amax(dim=-1).clamp(min=0.0)
    scale32 = (hi - lo) / 15.0
    scale = scale32.clamp(max=FP16_MAX).to(torch.float16)
    # A range that underflows fp16 gets the smallest subnormal; an all-zero group any nonzero value.
    fallback = torch.where(scale32 > 0, FP16_MIN_SUBNORMAL, 1.0).to(torch.float16)
    scale = torch.where(scale == 0, fallback, scale)
    s = scale.to(torch.float32)
    zero = torch.round(-lo / s).clamp(0, 15)
    q = (torch.round(w / s[..., None]) + zero[..., None]).clamp(0, 15)
    q = torch.where(finite, q, zero[..., None].expand_as(q))
    q = q.to(torch.uint8).view(out_f, ng * group_size)
    return BaseTensors(
        qweight=pack_nibbles(q),
        scales=scale,
        zeros=pack_nibbles(zero.to(torch.uint8)),
    )


def levels(base: BaseTensors, shape: tuple[int, int], group_size: int) -> torch.Tensor:
    """Signed quantization levels ``c = q - zero`` (int32, ``shape``), the context of the delta."""
    out_f, in_f = shape
    ng = n_groups(in_f, group_size)
    q = unpack_nibbles(base.qweight, in_f).to(torch.int32)
    z = unpack_nibbles(base.zeros, ng).to(torch.int32)
    return q - z.repeat_interleave(group_size, dim=1)[:, :in_f]


def predict_from_levels(
    levels_: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """``P = dtype(float32(c) * float32(scale))``: one exact multiply, one rounding cast."""
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=1)[:, : levels_.shape[1]]
    return (levels_.to(torch.float32) * s).to(dtype)


def predict(base: BaseTensors, shape: tuple[int, int], group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """The base's prediction ``P`` in ``dtype`` (this is also the lossy ``base`` mode weight)."""
    return predict_from_levels(levels(base, shape, group_size), base.scales, group_size, dtype)
