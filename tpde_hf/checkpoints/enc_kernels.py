"""The encoder side of the checkpoint delta codec, one module per job (this module only gathers their names).

* :mod:`~tpde_hf.checkpoints.enc_buffers`: reused buffers for one tensor's large temporaries (``scratch``);
* :mod:`~tpde_hf.checkpoints.enc_features`: context buckets, Adam features and fp32 predictions, compiled;
* :mod:`~tpde_hf.checkpoints.enc_estimate`: a candidate prediction's coded size on a sample;
* :mod:`~tpde_hf.checkpoints.enc_tables`: frequency tables, the encoder's packed division tables, slot symbols;
* :mod:`~tpde_hf.checkpoints.enc_stream`: the fused encoder (symbols, raw bits and rANS streams, the symbols never
  stored; the codec's one encode path) and the sampled decode of the pack-time verify;
* :mod:`~tpde_hf.checkpoints.enc_oracle`: the same streams from whole symbol arrays, for the tests only.

Example::

    from tpde_hf.checkpoints import enc_kernels as E
    with E.scratch():
        hist = E.sym_histogram(x, p, ctx, mode, 32, 23, n_ctx, nsym)
"""

from __future__ import annotations

from tpde_hf.checkpoints.enc_buffers import empty, release_scratch, scratch
from tpde_hf.checkpoints.enc_estimate import sample_cost, sample_costs
from tpde_hf.checkpoints.enc_features import (
    _half_exponent_into,
    _predict_f32_into,
    _ratio_into,
    _square_ctx_into,
    _weight_ctx_into,
    buckets,
    half_exponent,
    predict_f32,
    predict_ratio_f32,
    ratio_f32,
    square_ctx,
    weight_ctx,
)
from tpde_hf.checkpoints.enc_oracle import _encode_range, encode_compact, symbolize, unsymbolize_check
from tpde_hf.checkpoints.enc_stream import _fused_range, _symbols_block, decode_some, encode_fused, sym_histogram
from tpde_hf.checkpoints.enc_tables import _flat_tables_into, flat_tables, quantize_tables, slot_symbols

_flat_tables = flat_tables  # the name the earlier tests use

__all__ = ["_encode_range", "_flat_tables", "_flat_tables_into", "_fused_range", "_half_exponent_into",
           "_predict_f32_into", "_ratio_into", "_square_ctx_into", "_symbols_block", "_weight_ctx_into", "buckets",
           "decode_some", "empty", "encode_compact", "encode_fused", "flat_tables", "half_exponent", "predict_f32",
           "predict_ratio_f32", "quantize_tables", "ratio_f32", "release_scratch", "sample_cost", "sample_costs",
           "scratch", "slot_symbols", "square_ctx", "sym_histogram", "symbolize", "unsymbolize_check", "weight_ctx"]
