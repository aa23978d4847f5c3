"""The ``resident`` base storage: today's seven tensors through the storage path.

It stores the resident base as ``base_qweight, base_scales, base_zeros`` and the delta's three parts
as they are (``delta, lanes, tables``), so a repo written with ``storage="resident"`` is byte for byte
as large as the default layout. It exists to carry the resident layout through
:mod:`tpde_hf.storage_format` (and as the reference a smaller storage is measured against).

Example::

    convert("./model", "./model-tpde", storage="resident")
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tpde_hf.codec.encoded import EncodedTensor
from tpde_hf.codec.registry import BASE_STORAGE, CodecContext
from tpde_hf.codec.tensor_codec import decode_tensor, encode_tensor

_BASE = {"base_qweight": "qweight", "base_scales": "scales", "base_zeros": "zeros"}
_DELTA = ("delta", "lanes", "tables")


class ResidentStorage:
    """The resident layout as a :class:`~tpde_hf.codec.registry.BaseStorage` (see the module docstring)."""

    name = "resident"
    reads_resident_delta = True  # it stores the writer's own delta parts

    def encode(self, weight: torch.Tensor, base: Mapping[str, torch.Tensor],
               context: CodecContext) -> dict[str, torch.Tensor]:
        enc = context.options.get("encoded")  # the writer's own encode of ``weight``: not done twice
        if enc is None:
            enc = encode_tensor(weight, context.options["params"], context.key)
        return {**{b: base[r] for b, r in _BASE.items()}, **{s: getattr(enc, s) for s in _DELTA}}

    def decode_base(self, parts: Mapping[str, torch.Tensor], context: CodecContext) -> dict[str, torch.Tensor]:
        return {r: parts[b] for b, r in _BASE.items()}

    def decode(self, parts: Mapping[str, torch.Tensor], context: CodecContext) -> torch.Tensor:
        enc = EncodedTensor.from_parts(context.key, **{r: parts[b] for b, r in _BASE.items()},
                                       **{s: parts[s] for s in _DELTA}, meta=context.options["meta"])
        return decode_tensor(enc)


BASE_STORAGE.register(ResidentStorage)
