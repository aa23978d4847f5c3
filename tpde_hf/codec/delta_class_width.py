"""The ``class-width`` delta code (format version 2, meta index 1) as a :data:`registry.DELTA_CODES` plug-in.

One field width per (group, class), decoded without a dependent chain (:mod:`.class_width`). Two
implementations: the torch reference :mod:`.class_width` and the compiled
:mod:`.class_width_compiled` (numba); :func:`class_width_impl` picks the active backend's.

Example::

    from tpde_hf.codec.registry import DELTA_CODES
    enc = DELTA_CODES.get("class-width").encode_batch({"w": weight}, CodecParams(delta_code="class-width"))["w"]
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import torch

from tpde_hf.codec import class_width
from tpde_hf.codec.backend import active_backend
from tpde_hf.codec.base_quantizers import quantize_base
from tpde_hf.codec.encoded import CodecParams, EncodedTensor, checked_weight, named_errors
from tpde_hf.codec.registry import DELTA_CODES
from tpde_hf.errors import TpdeFormatError


def class_width_impl() -> ModuleType:
    """The class-width codec of the active backend: :mod:`.class_width_compiled` or the torch reference
    :mod:`.class_width` (both have ``encode``, ``decode`` and ``check_layout``, with identical results)."""
    if active_backend() == "compiled":
        from tpde_hf.codec import class_width_compiled  # numba: only when the compiled codec runs

        return class_width_compiled
    return class_width


class ClassWidthDeltaCode:
    """One width per (group, class) (see :class:`tpde_hf.codec.encoded.DeltaCode`)."""

    name = "class-width"
    index = 1
    format_version = 2

    def meta_fields(self, params: CodecParams) -> list[int]:
        return [class_width.OFFSET_SPAN, 0, 0, 0]

    def params_from_meta(self, group_size: int, fields: list[int], total_bits: int,
                         name: str | None) -> CodecParams:
        if fields != [class_width.OFFSET_SPAN, 0, 0, 0]:
            raise TpdeFormatError(name, f"class-width meta fields {fields} unsupported "
                                        f"(expected [{class_width.OFFSET_SPAN}, 0, 0, 0])")
        if not 0 <= total_bits < 1 << 48:
            raise TpdeFormatError(name, f"invalid payload bit count {total_bits}")
        return CodecParams(group_size=group_size, delta_code=self.name)

    def validate(self, enc: EncodedTensor) -> None:
        with named_errors(enc.name):
            class_width.validate(enc.class_width_code(), enc.base)

    def encode_batch(self, weights: dict[str, torch.Tensor], params: CodecParams) -> dict[str, EncodedTensor]:
        return {n: _encode(w, params, n) for n, w in weights.items()}

    def decode_batch(self, encs: list[EncodedTensor], verify: bool) -> list[torch.Tensor]:
        out = []
        for enc in encs:
            with named_errors(enc.name):
                out.append(class_width_impl().decode(enc.class_width_code(), enc.base, verify=verify))
        return out

    def inspect(self, enc: EncodedTensor) -> dict[str, Any]:
        return {"spans": int(enc.lanes.shape[1])}


def _encode(weight: torch.Tensor, params: CodecParams, name: str) -> EncodedTensor:
    weight = checked_weight(weight, params, name)
    base = quantize_base(weight, params)
    code = class_width_impl().encode(weight, base, params.group_size)
    return EncodedTensor(
        name=name, dtype=weight.dtype, shape=tuple(weight.shape), params=params, checksum=code.checksum,
        qweight=base.qweight, scales=base.scales, zeros=base.zeros,
        delta=code.words, lanes=code.offsets, tables=code.header, total_bits=code.total_bits,
    )


DELTA_CODES.register(ClassWidthDeltaCode)
