"""``ref-sparse``: a tensor of which few entries differ from the reference, as changed positions plus values.

TPDE's positional idea: the positions of the changed entries are coded as *gaps* (the count of unchanged
entries before each changed one), LEB128 varints entropy-coded by zstd (its Huffman / FSE stage); the changed
entries' values are the ordinal deltas against the reference at those positions, coded by ``ref-ord`` on the
gathered entries (context from the reference's exponent and the previous symbol, as for a whole tensor).
Decoding copies the reference and scatters the changed values: cheap when few entries changed.

Blob (one uint8 part, :mod:`tpde_hf.reference.codec` framing): the 20 x int64 header (fields: changed count,
varint bytes, gap zstd bytes, value bytes, value mode), the shape, the zstd gap section, then the changed
entries: a nested ``ref-ord`` blob, or their raw bits where that is smaller (a handful of values). The header's
xxh3 covers the rebuilt tensor: a damaged blob or a wrong reference is an error, never a wrong weight.

Example::

    codec = TENSOR_CODECS.get("ref-sparse")
    parts = codec.encode(finetuned, CodecContext("w", reference=base))   # None if it does not pay
    out = codec.decode(parts, CodecContext("w", reference=base))
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
import torch
import zstandard
from numba import njit

from tpde_hf.codec.registry import TENSOR_CODECS, CodecContext
from tpde_hf.errors import TpdeFormatError
from tpde_hf.reference import codec as C
from tpde_hf.reference.fastload import call

#: skip the work when more than this fraction changed: the gaps then cost more than ``ref-ord``'s zero symbols
MAX_FRACTION = 0.5
RAW, ORD = 0, 1  # how the changed values are stored: their bits as they are, or ref-ord against the reference's


@njit(cache=True, nogil=True)
def gaps_to_varints(pos, out):
    """LEB128 of ``pos[i] - pos[i - 1] - 1`` (``pos[-1]`` = -1) into ``out``; returns the bytes written."""
    w = 0
    prev = np.int64(-1)
    for i in range(pos.shape[0]):
        g = np.int64(pos[i]) - prev - 1
        prev = np.int64(pos[i])
        while g >= 0x80:
            out[w] = np.uint8((g & 0x7F) | 0x80)
            w += 1
            g >>= 7
        out[w] = np.uint8(g)
        w += 1
    return w


@njit(cache=True, nogil=True)
def varints_to_positions(data, n, pos):
    """Inverse of :func:`gaps_to_varints` into ``pos``; returns 0, or 1 if the bytes are malformed or a position
    falls outside ``[0, n)`` (a damaged blob can never index out of bounds)."""
    k = pos.shape[0]
    r = 0
    prev = np.int64(-1)
    for i in range(k):
        g = np.int64(0)
        shift = 0
        while True:
            if r >= data.shape[0] or shift > 56:
                return 1
            b = np.int64(data[r])
            r += 1
            g |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        prev = prev + 1 + g
        if prev >= n:
            return 1
        pos[i] = prev
    return 0 if r == data.shape[0] else 1


class RefSparse:
    """Few changed entries: gap-coded positions plus ``ref-ord``-coded values (see the module docstring)."""

    name = "ref-sparse"

    def encode(self, tensor: torch.Tensor, context: CodecContext) -> dict[str, torch.Tensor] | None:
        t = tensor.detach().to("cpu").contiguous()
        if t.dtype not in C.FLOATS or t.numel() == 0 or context.reference is None:
            return None
        try:
            ref = C.ref_as(context.reference, t, context.key)
        except TpdeFormatError:
            return None
        force = bool(context.options.get("force"))
        tb, rb = C._bits(t), C._bits(ref)
        pos = np.flatnonzero(tb != rb)
        if pos.size > MAX_FRACTION * t.numel() and not force:
            return None
        buf = np.empty(max(10 * pos.size, 1), np.uint8)
        nbytes = gaps_to_varints(pos, buf)
        gaps = zstandard.ZstdCompressor(level=19).compress(buf[:nbytes].tobytes())
        values, mode = np.zeros(0, np.uint8), RAW
        if pos.size:
            sub = torch.from_numpy(tb[pos].copy()).view(t.dtype)
            rsub = torch.from_numpy(rb[pos].copy()).view(t.dtype)
            values = sub.view(torch.uint8).numpy()  # raw: cheaper than a ref-ord header for a handful of values
            coded = C.RefOrd().encode(sub, CodecContext(context.key, rsub, {**context.options, "force": True}))
            if coded["blob"].numel() < values.size:
                values, mode = coded["blob"].numpy(), ORD
        header = C.make_header(self.name, t, int(context.options.get("ref_index", -1)), context.reference.dtype,
                               [pos.size, nbytes, len(gaps), values.size, mode])
        blob = C.pack(header, np.frombuffer(gaps, np.uint8), values)
        if blob.numel() >= t.numel() * t.element_size() and not force:
            return None
        return {"blob": blob}

    def decode(self, parts: Mapping[str, torch.Tensor], context: CodecContext) -> torch.Tensor:
        key = context.key
        h, shape, payload = C.read_header(C._blob(parts, key), self.name, key)
        dtype = C.dtype_of(int(h[2]), key)
        if dtype not in C.FLOATS:
            raise TpdeFormatError(key, f"ref-sparse blob names dtype {dtype}, which it cannot code")
        n = int(h[5])
        ref = C.ref_as(context.reference, None, key, dtype, shape)
        k, n_var, n_gaps, n_values, mode = (int(v) for v in h[8:13])
        if (not 0 <= k <= n or not k <= n_var <= 10 * max(k, 1) or min(n_gaps, n_values) < 0
                or mode not in (RAW, ORD) or (mode == RAW and n_values != k * ref.element_size())):
            raise TpdeFormatError(key, "ref-sparse blob header is damaged")
        gaps, p = C.take(payload, 0, n_gaps, "u1", key)
        values, _ = C.take(payload, p, n_values, "u1", key)
        try:  # a stream reader: a damaged frame header cannot make it allocate more than n_var + 1 bytes
            with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(gaps.tobytes())) as r:
                got = bytearray()
                while len(got) <= n_var and (more := r.read(n_var + 1 - len(got))):
                    got += more
            var = np.frombuffer(bytes(got), np.uint8)
        except zstandard.ZstdError as exc:
            raise TpdeFormatError(key, f"ref-sparse position stream is damaged ({exc})") from None
        pos = np.empty(k, np.int64)
        if var.size != n_var or call(varints_to_positions, var, n, pos):
            raise TpdeFormatError(key, "ref-sparse position stream is damaged")
        out = ref.clone()
        if k and mode == RAW:
            sub = torch.from_numpy(values).view(dtype)
        elif k:
            rsub = torch.from_numpy(C._bits(ref)[pos].copy()).view(dtype)
            sub = C.RefOrd().decode({"blob": torch.from_numpy(values)}, CodecContext(key, rsub, context.options))
        if k:
            if sub.numel() != k or sub.dtype != dtype:  # a nested ref-ord blob of another tensor
                raise TpdeFormatError(key, "ref-sparse value stream is damaged")
            C._bits(out)[pos] = C._bits(sub)
        return C.finish(out, h, key, self.name)


TENSOR_CODECS.register(RefSparse)
