"""The registered 4-bit base quantizers: how the encoder picks ``q``, ``scale`` and ``zero``.

The decoder never needs to know which one ran: it reads ``q``, ``scale`` and ``zero`` from the file, and
the delta makes the weight exact whatever the base. So a quantizer is an encoder choice
(``CodecParams.base_quantizer``), registered in :data:`tpde_hf.codec.registry.BASE_QUANTIZERS`:

* ``minmax`` (the default): each group's full range on the 16 codes (:func:`base_quant.quantize`; the
  compiled backend runs the same bits in numba);
* ``search``: a per-group search of a clipped range plus least-squares scale refits, for the smallest
  squared error (:func:`tpde_hf.codec.base_search.quantize_search`): a better ``base`` mode and draft,
  slower to convert.

Example::

    base = quantize_base(weight, CodecParams(base_quantizer="search"))
"""

from __future__ import annotations

import torch

from tpde_hf.codec import base_quant
from tpde_hf.codec.backend import active_backend
from tpde_hf.codec.base_search import quantize_search
from tpde_hf.codec.registry import BASE_QUANTIZERS

_CHUNK_ELEMENTS = 1 << 22


class MinMaxQuantizer:
    """Group range ``[min, max]`` (always containing 0) onto the 16 codes; round to nearest."""

    name = "minmax"

    def quantize(self, weight: torch.Tensor, group_size: int) -> base_quant.BaseTensors:
        if active_backend() == "compiled":
            from tpde_hf.codec import compiled  # numba: only when the compiled codec runs

            return compiled.quantize(weight, group_size)
        # row chunks bound the float32 temporaries of a large weight; the quantizer is row-local
        rows = max(1, _CHUNK_ELEMENTS // weight.shape[1])
        bases = [base_quant.quantize(weight[r0 : r0 + rows], group_size) for r0 in range(0, weight.shape[0], rows)]
        return base_quant.BaseTensors(*(torch.cat([getattr(b, f) for b in bases])
                                        for f in ("qweight", "scales", "zeros")))


class SearchQuantizer:
    """Per-group clipped-range search + least-squares scale refits (see :mod:`tpde_hf.codec.base_search`)."""

    name = "search"

    def quantize(self, weight: torch.Tensor, group_size: int) -> base_quant.BaseTensors:
        return quantize_search(weight, group_size)


BASE_QUANTIZERS.register(MinMaxQuantizer)
BASE_QUANTIZERS.register(SearchQuantizer)


def quantize_base(weight: torch.Tensor, params) -> base_quant.BaseTensors:
    """The base of a checked 2-D weight under ``params.group_size`` and ``params.base_quantizer``."""
    return BASE_QUANTIZERS.get(params.base_quantizer, getattr(params, "name", None)).quantize(weight,
                                                                                               params.group_size)
