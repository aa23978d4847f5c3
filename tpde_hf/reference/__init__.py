"""Fine-tunes stored as exact deltas against their reference (base) model.

* :mod:`tpde_hf.reference.codec`: the tensor codecs (``ref-same``, ``ref-ord``, ``ref-sparse``) registered in
  :data:`tpde_hf.codec.registry.TENSOR_CODECS`;
* :mod:`tpde_hf.reference.resolve`: finding the reference through huggingface_hub (cache, pinned commit,
  token, offline mode) and checking it against the stored checksums;
* :mod:`tpde_hf.reference.convert`: ``convert(..., reference=...)``;
* :mod:`tpde_hf.reference.load`: the load-time decode op (a transformers ``ConversionOps``);
* :mod:`tpde_hf.reference.verify`: ``tpde verify`` of a delta repo.

Example::

    from tpde_hf.conversion import convert
    convert("my-finetune", "my-finetune-tpde", reference="HuggingFaceTB/SmolLM2-135M@main")
"""

from __future__ import annotations

from tpde_hf.codec.registry import TENSOR_CODECS

CODEC_NAMES = ("ref-same", "ref-ord", "ref-sparse")


def _load_codecs() -> None:
    import tpde_hf.reference.codec  # noqa: F401  (registers ref-same, ref-ord)
    import tpde_hf.reference.sparse  # noqa: F401  (registers ref-sparse)


for _name in CODEC_NAMES:
    if _name not in TENSOR_CODECS:
        TENSOR_CODECS.lazy(_name, _load_codecs)
