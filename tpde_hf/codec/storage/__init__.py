"""Storage codecs: how a converted linear weight (4-bit base + exact delta) is laid out on disk.

``narrow-rans`` (:mod:`.codec`) entropy-codes the base and codes each weight inside its quantization
bin; it registers in :data:`tpde_hf.codec.registry.BASE_STORAGE` when this package is imported.

Example::

    from tpde_hf.codec.registry import BASE_STORAGE
    import tpde_hf.codec.storage  # noqa: F401  (registers "narrow-rans")
    codec = BASE_STORAGE.get("narrow-rans")
"""

from tpde_hf.codec.registry import BASE_STORAGE
from tpde_hf.codec.storage.codec import NarrowRans

BASE_STORAGE.register(NarrowRans)

__all__ = ["NarrowRans"]
