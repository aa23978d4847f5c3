"""torch modules of tpde-hf: :class:`TpdeLinear` and the storage of other tpde weights."""

from tpde_hf.nn.linear import TpdeLinear, TpdeWeightStore

__all__ = ["TpdeLinear", "TpdeWeightStore"]
