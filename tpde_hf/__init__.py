"""tpde-hf: Hugging Face models stored as a 4-bit base plus a lossless delta."""

from typing import Any

from tpde_hf import _autoregister
from tpde_hf.codec import CodecParams, EncodedTensor, decode_tensor, decode_tensors, encode_tensor, inspect_tensor
from tpde_hf.errors import TpdeFormatError

__version__ = "0.2.0"

__all__ = [
    "CodecParams",
    "EncodedTensor",
    "TpdeConfig",
    "TpdeFormatError",
    "TpdeHfQuantizer",
    "TpdeLinear",
    "decode_tensor",
    "decode_tensors",
    "encode_tensor",
    "inspect_tensor",
]

# transformers integration: loaded on first use so that `import tpde_hf` does not import transformers.
_LAZY = {"TpdeConfig": "tpde_hf.config", "TpdeHfQuantizer": "tpde_hf.quantizer", "TpdeLinear": "tpde_hf.nn.linear"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tpde_hf' has no attribute {name!r}")


# Register the "tpde" quantizer with transformers now, or as soon as transformers loads its registry.
_autoregister.install()

# A delta repo's decode starts when from_pretrained reads its config.json (TPDE_REFERENCE_EARLY=0: when the quantizer
# starts): see tpde_hf.reference.early
if __import__("os").environ.get("TPDE_REFERENCE_EARLY") != "0":
    from tpde_hf.reference.early import install as _install_early_reference

    _install_early_reference()
_LAZY.update(draft_model="tpde_hf.speculative", generate_exact="tpde_hf.speculative")  # drafting by the base
