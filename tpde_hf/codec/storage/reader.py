"""Reading a ``narrow-rans`` weight's stored blobs: headers, block indexes, tables, exceptions, final checksum.

Every parser checks what it reads (layout version, dtype code, group size, shape, sizes of each section, that the
tables sum to their scale, that zero points and exception positions are in range) and raises
:class:`~tpde_hf.errors.TpdeFormatError` naming the tensor; the decode drivers (:mod:`.codec`) and the compiled
decoders (:mod:`.streams`, :mod:`.delta`, :mod:`.fused`) then read only what passed. :func:`_finish_weight`
checks the decoded weight against its stored xxh3 checksum.

Example::

    b = _base_sections(parts, "model.layers.0.mlp.up_proj.weight")   # header fields, q stream, scales, zeros
    d = _delta_sections(parts, name, numel, torch.bfloat16)           # delta stream, exceptions, checksum
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

import numpy as np
import torch
import xxhash

from tpde_hf.codec import base_quant
from tpde_hf.codec.ordinal import CODE_DTYPES
from tpde_hf.codec.storage import streams as S
from tpde_hf.codec.storage.blob import unpack_blob, words_of, zstd_unpack
from tpde_hf.errors import TpdeFormatError

VERSIONS = (1, 2)  # layouts this reader decodes: 1, one rANS state per block; 2, two interleaved states
_LANES = {1: 1, 2: 2}  # rANS states per block
BLOCK = 1 << 16
_BASE = struct.Struct("<BBHIIQ")
_DELTA = struct.Struct("<BB2xIQ")
_MANTISSA = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def _blocks(numel: int) -> list[tuple[int, int]]:
    return [(i, min(i + BLOCK, numel)) for i in range(0, numel, BLOCK)]


def _checksum(*arrays: np.ndarray, header: tuple[int, ...] = ()) -> int:
    """xxh3-64 of ``header`` (as int64s) and the arrays' bytes."""
    h = xxhash.xxh3_64(np.array(header, dtype="<i8").tobytes())
    for a in arrays:
        h.update(np.ascontiguousarray(a).view(np.uint8).data)
    return h.intdigest()


def _parse_base(blob: torch.Tensor, name: str) -> tuple[tuple[int, ...], list[memoryview]]:
    fields, sections = unpack_blob(blob, _BASE, 6, name)
    version, dcode, g, out_f, in_f, _ = fields
    if version not in VERSIONS:
        raise TpdeFormatError(name, f"narrow-rans layout {version} is not one of {VERSIONS}; upgrade tpde-hf")
    if dcode not in CODE_DTYPES:
        raise TpdeFormatError(name, f"unknown source dtype code {dcode}")
    if g not in base_quant.SUPPORTED_GROUP_SIZES:
        raise TpdeFormatError(name, f"group size {g} not in {base_quant.SUPPORTED_GROUP_SIZES}")
    if out_f <= 0 or in_f <= 0 or out_f * in_f >= 1 << 40:
        raise TpdeFormatError(name, f"invalid shape {[out_f, in_f]}")
    return fields, sections


def _block_index(data: memoryview, numel: int, n_words: int, name: str, what: str,
                 version: int) -> tuple[np.ndarray, np.ndarray]:
    """``(states [blocks, 2], word counts [blocks])`` of a layout's block index (layout 1: lane 1 unused, its
    state ``2**16``)."""
    nb = len(_blocks(numel))
    nl = _LANES[version]
    if len(data) != nb * 4 * (nl + 1):
        raise TpdeFormatError(name, f"{what} block index holds {len(data)} bytes, expected {nb * 4 * (nl + 1)}")
    index = np.frombuffer(data, dtype="<u4").reshape(nb, nl + 1).astype(np.int64)
    states = np.full((nb, S.NLANES), S.STATE_LOW, dtype=np.int64)
    states[:, :nl] = index[:, :nl]
    counts = np.ascontiguousarray(index[:, nl])
    if int(counts.sum()) != n_words or bool((states < S.STATE_LOW).any()):
        raise TpdeFormatError(name, f"{what} block index disagrees with its words (truncated or corrupt)")
    return states, counts


def _base_sections(parts: Mapping[str, torch.Tensor], name: str) -> dict:
    """The ``base_blob`` parsed and checked, all but the q stream decoded: ``fields`` (the header), ``index``
    and ``words`` of the q stream, its tables ``lutq`` / ``fcq``, ``s16`` (the scales' uint16 patterns, [out, ng])
    and ``z`` (the zero points, [out, ng])."""
    if "base_blob" not in parts:
        raise TpdeFormatError(name, "narrow-rans part 'base_blob' is missing")
    fields, (index_b, words_b, table_b, hi_b, lo_b, zeros_b) = _parse_base(parts["base_blob"], name)
    version, dcode, g, out_f, in_f, checksum = fields
    ng = base_quant.n_groups(in_f, g)
    words = words_of(words_b, name)
    index = _block_index(index_b, out_f * in_f, words.size, name, "q", version)
    freq = zstd_unpack(table_b, "<u2", 256, name, "q tables").astype(np.int64).reshape(16, 16)
    if bool((freq.sum(axis=1) != 1 << S.QPB).any()):
        raise TpdeFormatError(name, "q tables do not sum to the probability scale")
    cum = np.cumsum(freq, axis=1) - freq
    lutq = np.repeat(np.tile(np.arange(16, dtype=np.uint8), 16), freq.ravel())  # [16 * 2**QPB]: code of a slot
    fcq = ((freq << 16) | cum).ravel()  # freq (<= 2**QPB) << 16 | cum, one read per code
    hi = zstd_unpack(hi_b, "u1", out_f * ng, name, "scales").astype(np.uint16)
    lo = zstd_unpack(lo_b, "u1", out_f * ng, name, "scales").astype(np.uint16)
    s16 = ((hi << 8) | lo).reshape(out_f, ng)
    if bool(((s16 & 0x7C00) == 0x7C00).any()):  # fp16 exponent all ones: inf or NaN
        raise TpdeFormatError(name, "scales contain inf or NaN")
    z = zstd_unpack(zeros_b, "u1", out_f * ng, name, "zero points").reshape(out_f, ng)
    if bool((z > 15).any()):
        raise TpdeFormatError(name, "a zero point exceeds 15")
    return {"fields": fields, "index": index, "words": words, "lutq": lutq, "fcq": fcq, "s16": s16, "z": z}


def _scales(s16: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(s16.view(np.float16).copy())  # numpy's float16: no torch call (a GIL round trip)


def _delta_sections(parts: Mapping[str, torch.Tensor], name: str, numel: int, dtype: torch.dtype) -> dict:
    """The ``delta_blob`` parsed and checked: ``version``, ``tz``, ``checksum``, the stream's ``index`` and
    ``words``, and the exceptions' positions ``pos`` and bit patterns ``patt``."""
    if "delta_blob" not in parts:
        raise TpdeFormatError(name, "narrow-rans part 'delta_blob' is missing")
    (version, tz, n_exc, checksum), (index_b, words_b, exc_b) = unpack_blob(parts["delta_blob"], _DELTA, 3, name)
    if version not in VERSIONS:
        raise TpdeFormatError(name, f"narrow-rans delta layout {version} is not one of {VERSIONS}; upgrade tpde-hf")
    words = words_of(words_b, name)
    index = _block_index(index_b, numel, words.size, name, "delta", version)
    pos = np.zeros(0, dtype=np.int64)
    patt = np.zeros(0, dtype=np.uint32)
    if n_exc > numel:
        raise TpdeFormatError(name, f"{n_exc} exceptions in a tensor of {numel} weights")
    if n_exc:
        raw = zstd_unpack(exc_b, "u1", n_exc * 12, name, "exceptions")
        gaps = raw[: 8 * n_exc].view("<u8")
        patt = raw[8 * n_exc:].view("<u4").astype(np.uint32)
        if bool((gaps >= numel).any()) or bool((gaps[1:] == 0).any()):
            raise TpdeFormatError(name, "exception positions are out of order or out of range")
        pos = np.cumsum(gaps.astype(np.int64))
        if pos[-1] >= numel:
            raise TpdeFormatError(name, "exception positions are out of range")
    elif len(exc_b):
        raise TpdeFormatError(name, "an exception list without exceptions")
    mb = _MANTISSA[dtype]
    if tz > mb:
        raise TpdeFormatError(name, f"grid shift {tz} exceeds the {mb} mantissa bits of {dtype}")
    return {"version": version, "tz": tz, "checksum": checksum, "index": index, "words": words, "pos": pos,
            "patt": patt}


def _finish_weight(out: np.ndarray, d: dict, dtype: torch.dtype, shape: tuple[int, int], name: str) -> torch.Tensor:
    """The decoded bit patterns ``out`` with the exceptions patched in, checked against the weight's checksum."""
    if d["pos"].size:
        patt = d["patt"]
        out[d["pos"]] = patt.astype(np.uint16).view(np.int16) if out.dtype == np.int16 else patt.view(np.int32)
    if _checksum(out) != d["checksum"]:
        raise TpdeFormatError(name, "the decoded weight does not match its checksum (corrupt delta)")
    return torch.from_numpy(out.reshape(shape)).view(dtype)
