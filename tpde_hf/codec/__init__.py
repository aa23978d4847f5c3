"""The tpde codec: 4-bit group-wise base + a context-coded, bit-exact delta."""

from tpde_hf.codec.backend import active_backend, limit_codec_threads, use_backend
from tpde_hf.codec.tensor_codec import (
    FORMAT_VERSION,
    SUFFIXES,
    CodecParams,
    EncodedTensor,
    decode_tensor,
    decode_tensors,
    encode_tensor,
    encode_tensors,
    inspect_tensor,
    tensor_checksum,
)

__all__ = [
    "active_backend",
    "limit_codec_threads",
    "use_backend",
    "FORMAT_VERSION",
    "SUFFIXES",
    "CodecParams",
    "EncodedTensor",
    "decode_tensor",
    "decode_tensors",
    "encode_tensor",
    "encode_tensors",
    "inspect_tensor",
    "tensor_checksum",
]
