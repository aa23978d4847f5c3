"""Training checkpoints stored as exact deltas of their neighbours (issue 21).

* :mod:`~tpde_hf.checkpoints.codec`: the ``ckpt-delta`` tensor codec (registered in
  :data:`tpde_hf.codec.registry.TENSOR_CODECS`), with :mod:`~tpde_hf.checkpoints.kernels` (numba) and
  :mod:`~tpde_hf.checkpoints.predict` (what Adam's arithmetic predicts each tensor from, both directions);
* :mod:`~tpde_hf.checkpoints.layout`: where the tensors sit in ``model.safetensors`` / ``optimizer.pt``;
* :mod:`~tpde_hf.checkpoints.store`: entries, chains, keyframes, atomic writes;
* :mod:`~tpde_hf.checkpoints.backward`: backward deltas (the default): the newest checkpoint stays plain,
  each older one is a delta against the next later one;
* :mod:`~tpde_hf.checkpoints.api`: :func:`pack` (forward), :func:`restore`, :func:`compact`, :func:`collect`;
* :mod:`~tpde_hf.checkpoints.assist`: the waiting training thread helps finish a pack;
* :mod:`~tpde_hf.checkpoints.callback`: :class:`TpdeCheckpointCallback` for ``transformers.Trainer``;
* :mod:`~tpde_hf.checkpoints.cli`: ``tpde ckpt ls | pack | restore``.

Example::

    from tpde_hf.checkpoints import TpdeCheckpointCallback, restore
    trainer = Trainer(..., callbacks=[TpdeCheckpointCallback()])
    trainer.train()
    trainer.train(resume_from_checkpoint="out/checkpoint-60")    # the newest: plain, nothing to do
    restore("out/checkpoint-40")                                  # an older one: one call first
    trainer.train(resume_from_checkpoint="out/checkpoint-40")
"""

from __future__ import annotations

from typing import Any

from tpde_hf.codec.registry import TENSOR_CODECS

CODEC_NAME = "ckpt-delta"
__all__ = ["TpdeCheckpointCallback", "collect", "compact", "pack", "pack_all", "restore"]


def _load_codec() -> None:
    import tpde_hf.checkpoints.codec  # noqa: F401  (registers the codec)


if CODEC_NAME not in TENSOR_CODECS:
    TENSOR_CODECS.lazy(CODEC_NAME, _load_codec)


def __getattr__(name: str) -> Any:
    # Lazy: importing the package must not pull in transformers or numba.
    if name == "TpdeCheckpointCallback":
        from tpde_hf.checkpoints.callback import TpdeCheckpointCallback

        return TpdeCheckpointCallback
    if name in ("collect", "compact", "pack", "pack_all", "restore"):
        from tpde_hf.checkpoints import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
