"""Bit-pattern ordinals: a monotonic, bijective map from float bit patterns to integers.

``ord(x)`` is the float's bit pattern read as sign-magnitude and re-encoded as two's complement,
with ``-0.0 -> -1`` so that the map stays a bijection on *every* bit pattern:

* ``+0.0 -> 0``, ``-0.0 -> -1``; the ordinals of positive floats are their raw bits;
* negative floats ``b`` map to ``-1 - (b & magnitude_mask)``;
* ±inf and every NaN payload keep their place beyond the finite range, so they round-trip too.

The map is its own inverse on the signed bit view: ``v ^ ((v >> (w-1)) & mag_mask)``.
Deltas between ordinals are taken modulo ``2**w`` (w = 16 or 32), so they always fit the
source width and reconstruction ``ord^-1(ord(P) + r)`` is plain wrapping integer arithmetic.
"""

from __future__ import annotations

import torch

from tpde_hf.errors import TpdeFormatError

#: Source dtypes the codec accepts, with their stable on-disk code and bit width.
DTYPE_CODES: dict[torch.dtype, int] = {torch.bfloat16: 1, torch.float16: 2, torch.float32: 3}
CODE_DTYPES: dict[int, torch.dtype] = {v: k for k, v in DTYPE_CODES.items()}
#: The integer dtype of the same width, for bit-level views of a weight.
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def bit_width(dtype: torch.dtype) -> int:
    """16 for bf16/fp16, 32 for fp32."""
    check_dtype(dtype)
    return 16 if INT_VIEW[dtype] is torch.int16 else 32


def check_dtype(dtype: torch.dtype, name: str | None = None) -> None:
    if dtype not in DTYPE_CODES:
        raise TpdeFormatError(
            name, f"unsupported dtype {dtype}; tpde encodes bfloat16, float16 and float32 weights"
        )


def to_ordinal(x: torch.Tensor) -> torch.Tensor:
    """Ordinals of ``x`` as int64 (any shape). Example: ``to_ordinal(torch.tensor([-0.0]))`` -> ``[-1]``."""
    w = bit_width(x.dtype)
    v = x.contiguous().view(INT_VIEW[x.dtype]).to(torch.int64)
    return v ^ ((v >> (w - 1)) & ((1 << (w - 1)) - 1))


def from_ordinal(o: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`to_ordinal`; ``o`` must lie in the signed range of the dtype's width."""
    w = bit_width(dtype)
    v = o ^ ((o >> (w - 1)) & ((1 << (w - 1)) - 1))
    return v.to(INT_VIEW[dtype]).view(dtype)


def wrap(x: torch.Tensor, width: int) -> torch.Tensor:
    """Reduce int64 ``x`` modulo ``2**width`` into the signed range ``[-2**(width-1), 2**(width-1))``."""
    half = 1 << (width - 1)
    return ((x + half) & ((1 << width) - 1)) - half
