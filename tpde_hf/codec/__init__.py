"""The tpde codec: 4-bit group-wise base + a context-coded, bit-exact delta."""

from tpde_hf.codec.tensor_codec import (
    FORMAT_VERSION,
    SUFFIXES,
    CodecParams,
    EncodedTensor,
    decode_tensor,
    decode_tensors,
    encode_tensor,
    inspect_tensor,
    tensor_checksum,
)

__all__ = [
    "FORMAT_VERSION",
    "SUFFIXES",
    "CodecParams",
    "EncodedTensor",
    "decode_tensor",
    "decode_tensors",
    "encode_tensor",
    "inspect_tensor",
    "tensor_checksum",
]
