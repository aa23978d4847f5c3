"""torch modules of tpde-hf: :class:`TpdeLinear` and the storage of other tpde weights.

Layers, bottom up (each imports only those below it):

* :mod:`~tpde_hf.nn.holder`: the stored parts of one weight on a module, and their decoding;
* :mod:`~tpde_hf.nn.offload`: ``lossless-offload``'s host-held delta and its prefetcher;
* :mod:`~tpde_hf.nn.weight_access`: the weight a forward, or model code reading ``.weight``, gets;
* :mod:`~tpde_hf.nn.linear`: :class:`TpdeLinear`, :class:`TpdeWeightStore`;
* :mod:`~tpde_hf.nn.fused`: forward hooks that rebuild fused MoE parameters and other modules' weights.

Example::

    from tpde_hf.nn import TpdeLinear
    layer = TpdeLinear.from_dense(torch.nn.Linear(256, 64, dtype=torch.bfloat16))
    layer.weight   # the exact weight, rebuilt on demand (read-only, not a parameter)
"""

from tpde_hf.nn.linear import TpdeLinear, TpdeWeightStore

__all__ = ["TpdeLinear", "TpdeWeightStore"]
