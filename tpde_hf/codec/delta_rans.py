"""The ``rans`` delta code (format version 1, meta index 0) as a :data:`registry.DELTA_CODES` plug-in.

Context-coded rANS lanes (see :mod:`.encoded` for the stored parts). Two implementations behind one
plug-in: the compiled codec (:mod:`.compiled`, numba, the default) and the numpy reference
(:mod:`.rans_reference`); :mod:`.backend` picks one, and both write identical bytes.

Example::

    from tpde_hf.codec.registry import DELTA_CODES
    enc = DELTA_CODES.get("rans").encode_batch({"w": weight}, CodecParams())["w"]
"""

from __future__ import annotations

from typing import Any

import torch

from tpde_hf.codec import bitpack, rans, rans_reference
from tpde_hf.codec.backend import active_backend
from tpde_hf.codec.base_quantizers import quantize_base
from tpde_hf.codec.encoded import N_CONTEXTS, CodecParams, EncodedTensor, LaneLayout, checked_weight
from tpde_hf.codec.ordinal import bit_width
from tpde_hf.codec.registry import DELTA_CODES
from tpde_hf.codec.symbols import SymbolSpec
from tpde_hf.errors import TpdeFormatError


class RansDeltaCode:
    """Context-coded rANS lanes: the smaller file (see :class:`tpde_hf.codec.encoded.DeltaCode`)."""

    name = "rans"
    index = 0
    format_version = 1

    def meta_fields(self, params: CodecParams) -> list[int]:
        return [params.lane_len, params.prob_bits, params.sym_k, params.sym_m]

    def params_from_meta(self, group_size: int, fields: list[int], total_bits: int,
                         name: str | None) -> CodecParams:
        if total_bits != 0:
            raise TpdeFormatError(name, f"a rANS meta holds a payload bit count ({total_bits})")
        lane_len, prob_bits, sym_k, sym_m = fields
        return CodecParams(group_size=group_size, lane_len=lane_len, prob_bits=prob_bits, sym_k=sym_k, sym_m=sym_m)

    def validate(self, enc: EncodedTensor) -> None:
        name = enc.name
        if enc.lanes.dtype != torch.int32 or tuple(enc.lanes.shape) != (enc.layout.n_lanes, 2):
            raise TpdeFormatError(name, f"lanes is {enc.lanes.dtype}{list(enc.lanes.shape)}, "
                                        f"expected torch.int32{[enc.layout.n_lanes, 2]}")
        for key in ("delta", "tables"):
            t = getattr(enc, key)
            if t.dtype != torch.uint8 or t.dim() != 1:
                raise TpdeFormatError(name, f"{key} must be a 1-D uint8 tensor, got {t.dtype}{list(t.shape)}")
        states, n_words, n_raw = enc.lane_fields()
        steps = enc.layout.steps
        if bool(((states < rans.STATE_LOW) | (states >= 1 << 32)).any()):
            raise TpdeFormatError(name, "a lane's rANS state is out of range")
        if bool((n_words > steps).any()) or bool((n_raw > steps * enc.spec.max_raw_bits).any()):
            raise TpdeFormatError(name, "a lane's length does not fit its element count")
        want = 4 * -(-int(n_words.sum()) // 2) + 4 * bitpack.n_words(int(n_raw.sum()))
        if enc.delta.numel() != want:
            raise TpdeFormatError(
                name, f"delta payload has {enc.delta.numel()} bytes, the lane table says {want} (truncated or corrupt)"
            )
        enc.frequencies()

    def encode_batch(self, weights: dict[str, torch.Tensor], params: CodecParams) -> dict[str, EncodedTensor]:
        if active_backend() == "compiled":
            return {n: _encode_compiled(w, params, n) for n, w in weights.items()}
        return rans_reference.encode_batch(weights, params)

    def decode_batch(self, encs: list[EncodedTensor], verify: bool) -> list[torch.Tensor]:
        if active_backend() == "compiled":
            return [_decode_compiled(enc, verify) for enc in encs]
        return rans_reference.decode_batch(encs, verify)

    def inspect(self, enc: EncodedTensor) -> dict[str, Any]:
        return {"lanes": enc.layout.n_lanes, "steps": enc.layout.steps}


def _encode_compiled(weight: torch.Tensor, params: CodecParams, name: str) -> EncodedTensor:
    from tpde_hf.codec import compiled  # numba: only when the compiled codec runs

    weight = checked_weight(weight, params, name)
    base = quantize_base(weight, params)
    spec = SymbolSpec(params.sym_k, params.sym_m, bit_width(weight.dtype))
    layout = LaneLayout.for_numel(weight.numel(), params.lane_len)
    lanes = compiled.encode_lanes(weight, base, spec, layout, params.group_size, params.prob_bits, N_CONTEXTS)
    return rans_reference.assemble(name, weight, params, base, lanes.freq, lanes.states, lanes.n_words,
                                   lanes.words, lanes.n_raw, lanes.raw_words)


def _decode_compiled(enc: EncodedTensor, verify: bool) -> torch.Tensor:
    from tpde_hf.codec import compiled

    if enc._compiled_lut is None:  # cached: a layer decoded at every forward builds it once
        enc._compiled_lut = compiled.decode_table(enc.frequencies(), enc.params.prob_bits, enc.spec)
    w = compiled.decode(enc, enc._compiled_lut)
    rans_reference.check_checksum(enc, w, verify)
    return w


DELTA_CODES.register(RansDeltaCode)
