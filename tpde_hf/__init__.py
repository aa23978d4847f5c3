"""tpde-hf: Hugging Face models stored as a 4-bit base plus a lossless delta."""

from tpde_hf.codec import CodecParams, EncodedTensor, decode_tensor, decode_tensors, encode_tensor, inspect_tensor
from tpde_hf.errors import TpdeFormatError

__version__ = "0.1.0"

__all__ = [
    "CodecParams",
    "EncodedTensor",
    "TpdeFormatError",
    "decode_tensor",
    "decode_tensors",
    "encode_tensor",
    "inspect_tensor",
]
