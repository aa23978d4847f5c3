"""numba loops of the checkpoint delta codec: symbols with context, rANS, packed raw bits.

A value ``x`` (a float's bit pattern, sign-extended to int64) is coded against a prediction ``p``
(same dtype) in one of two modes:

* ``MODE_ORD``: ``u = zigzag(wrap(ord(x) - ord(p)))``; the symbol is ``u`` itself below 4, else the
  bit length of ``u`` and the 2 bits after its leading one; the bits below are stored raw.
* ``MODE_FLD``: the symbol is the sign and exponent field of ``x`` with the sign flipped where ``p``
  is negative; the mantissa is stored raw. For values a prediction cannot place to within a few
  ulps (Adam's first moment 20 steps later), where an ordinal delta would cross zero.

Symbols are rANS-coded (32-bit state, 16-bit words, 12-bit frequencies) with one frequency table
per context; raw bits are packed LSB first into uint32 words. The element range is cut into chunks,
each with its own rANS state, words and bits, so that chunks encode and decode in parallel.

Every read is clamped into its array, so a corrupt payload never reads out of bounds; a chunk
whose final state or word pointers are not exactly where the encoder left them is reported in
the returned ``bad`` flags and the caller raises.

Example (see ``codec.py`` for the driver)::

    sym, nraw, raw = symbolize(x, p, MODE_ORD, 32, 23)
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np
from numba import njit, prange

from tpde_hf.codec.compiled_kernels import _ordinal, _wrap  # the format's ord map, shared

MODE_ORD = 0
MODE_FLD = 1
PROB_BITS = 12
LANES = 4  # interleaved rANS states per chunk: hides the latency of each state's dependent chain
ADAM_EPS = np.float32(1e-8)  # Adam's epsilon in m / (sqrt(v) + eps): the encoder's and decoder's feature
STATE_LOW = 1 << 16
_local = threading.local()


def is_serial() -> bool:
    """Whether this thread runs the chunk loops on itself alone (see :func:`serial`)."""
    return getattr(_local, "serial", False)


@contextlib.contextmanager
def serial(on: bool = True) -> Iterator[None]:
    """Run the chunk loops of this thread without numba's worker threads.

    The checkpoint callback packs on a background thread at low OS priority; numba's workers are
    shared by the process and would not inherit that priority, so its work stays on its own thread.
    """
    old = is_serial()
    _local.serial = on
    try:
        yield
    finally:
        _local.serial = old


@njit(cache=True, inline="always")
def _bitlen(u):
    n = np.int64(0)
    while u > 0:
        u >>= 1
        n += 1
    return n


def n_symbols(mode: int, width: int, mant_bits: int) -> int:
    """Alphabet size: 4 + 4 per bit length above 2 (``MODE_ORD``); sign and exponent (``MODE_FLD``)."""
    if mode == MODE_ORD:
        return 4 + (width - 2) * 4
    return 1 << (width - mant_bits)


@njit(cache=True, nogil=True)
def symbolize_into(x, p, mode, width, mant_bits, sym, nraw, raw):
    """Fill ``sym`` (uint16), ``nraw`` (uint8), ``raw`` (uint32) with every element's symbol, raw bit count and
    raw value (the caller allocates: the encoder uses numpy's allocator, see ``enc_oracle.symbolize``)."""
    sign_shift = width - 1 - mant_bits
    for i in range(x.shape[0]):
        xv = np.int64(x[i])
        pv = np.int64(p[i])
        if mode == 0:
            r = _wrap(_ordinal(xv, width) - _ordinal(pv, width), width)
            u = (r << 1) ^ (r >> 63)
            if u < 4:
                sym[i] = u
                nraw[i] = 0
                raw[i] = 0
            else:
                e = _bitlen(u) - 1
                nr = e - 2
                sym[i] = 4 + (e - 2) * 4 + ((u >> nr) & 3)
                nraw[i] = nr
                raw[i] = u & ((np.int64(1) << nr) - 1)
        else:
            ub = xv & ((np.int64(1) << width) - 1)
            flip = np.int64(1) if pv < 0 else np.int64(0)
            sym[i] = (ub >> mant_bits) ^ (flip << sign_shift)
            nraw[i] = mant_bits
            raw[i] = ub & ((np.int64(1) << mant_bits) - 1)


@njit(cache=True, nogil=True)
def symbolize(x, p, mode, width, mant_bits):
    """``(symbols uint16, raw bit counts uint8, raw values uint32)`` of every element."""
    n = x.shape[0]
    sym = np.empty(n, np.uint16)
    nraw = np.empty(n, np.uint8)
    raw = np.empty(n, np.uint32)
    symbolize_into(x, p, mode, width, mant_bits, sym, nraw, raw)
    return sym, nraw, raw


@njit(cache=True, nogil=True)
def histogram(sym, ctx, n_ctx, nsym):
    h = np.zeros((n_ctx, nsym), np.int64)
    for i in range(sym.shape[0]):
        h[ctx[i], sym[i]] += 1
    return h


@njit(cache=True, nogil=True)
def _encode_alloc(n, chunk):
    nch = (n + chunk - 1) // chunk
    return (np.empty((nch, LANES), np.int64), np.empty(nch, np.int64), np.empty(nch, np.int64),
            np.empty((nch, chunk * 2 + 4), np.uint16), np.empty((nch, chunk + 2), np.uint32))


@njit(cache=True, parallel=True, nogil=True)
def _encode_par(sym, nraw, raw, ctx, freq, cum, chunk):
    states, n_words, n_bitwords, words, bitwords = _encode_alloc(sym.shape[0], chunk)
    for c in prange(states.shape[0]):
        _encode_chunk(c, sym, nraw, raw, ctx, freq, cum, chunk, states, n_words, n_bitwords, words, bitwords)
    return states, n_words, n_bitwords, words, bitwords


@njit(cache=True, nogil=True)
def _encode_ser(sym, nraw, raw, ctx, freq, cum, chunk):
    states, n_words, n_bitwords, words, bitwords = _encode_alloc(sym.shape[0], chunk)
    for c in range(states.shape[0]):
        _encode_chunk(c, sym, nraw, raw, ctx, freq, cum, chunk, states, n_words, n_bitwords, words, bitwords)
    return states, n_words, n_bitwords, words, bitwords


def encode_chunks(sym, nraw, raw, ctx, freq, cum, chunk):
    """rANS-encode symbols and pack raw bits, chunk by chunk (chunks in parallel unless :func:`serial`).

    The plain reference encoder: the codec writes with :func:`tpde_hf.checkpoints.enc_stream.encode_fused`
    (symbols made in cache, flat tables, per-step inverse checks); the tests hold it, through the symbol-array
    oracle :func:`tpde_hf.checkpoints.enc_oracle.encode_compact`, to this one's stream byte for byte.

    Returns ``(states, n_words, n_bitwords, words[n_chunks, cap16], bitwords[n_chunks, cap32])``;
    chunk ``c``'s words are ``words[c, cap16 - n_words[c]:]`` in decoder order.
    """
    return (_encode_ser if is_serial() else _encode_par)(sym, nraw, raw, ctx, freq, cum, chunk)


@njit(cache=True, nogil=True)
def _encode_chunk(c, sym, nraw, raw, ctx, freq, cum, chunk, states, n_words, n_bitwords, words, bitwords):
    n = sym.shape[0]
    cap16 = words.shape[1]
    lo = c * chunk
    hi = min(n, lo + chunk)
    xs = np.full(LANES, np.int64(STATE_LOW))
    w = cap16
    for i in range(hi - 1, lo - 1, -1):
        k = ctx[i]
        s = sym[i]
        j = (i - lo) & (LANES - 1)
        x = xs[j]
        f = np.int64(freq[k, s])
        if x >= (f << (32 - PROB_BITS)):
            w -= 1
            words[c, w] = x & 0xFFFF
            x >>= 16
        xs[j] = ((x // f) << PROB_BITS) + (x % f) + np.int64(cum[k, s])
    states[c] = xs
    n_words[c] = cap16 - w
    acc = np.uint64(0)
    nacc = np.int64(0)
    b = 0
    for i in range(lo, hi):
        acc |= np.uint64(raw[i]) << np.uint64(nacc)
        nacc += np.int64(nraw[i])
        if nacc >= 32:
            bitwords[c, b] = np.uint32(acc & np.uint64(0xFFFFFFFF))
            b += 1
            acc >>= np.uint64(32)
            nacc -= 32
    if nacc > 0:
        bitwords[c, b] = np.uint32(acc & np.uint64(0xFFFFFFFF))
        b += 1
    n_bitwords[c] = b


@njit(cache=True, parallel=True, nogil=True)
def _decode_par(p, ctx, lut, freq, cum, states, word_start, words, bit_start, bitwords,
                mode, width, mant_bits, chunk, out):
    bad = np.zeros(states.shape[0], np.int64)
    for c in prange(states.shape[0]):
        bad[c] = _decode_chunk(c, p, ctx, lut, freq, cum, states, word_start, words, bit_start, bitwords,
                               mode, width, mant_bits, chunk, out)
    return bad


@njit(cache=True, nogil=True)
def _decode_ser(p, ctx, lut, freq, cum, states, word_start, words, bit_start, bitwords,
                mode, width, mant_bits, chunk, out):
    bad = np.zeros(states.shape[0], np.int64)
    for c in range(states.shape[0]):
        bad[c] = _decode_chunk(c, p, ctx, lut, freq, cum, states, word_start, words, bit_start, bitwords,
                               mode, width, mant_bits, chunk, out)
    return bad


def decode_chunks(p, ctx, lut, freq, cum, states, word_start, words, bit_start, bitwords,
                  mode, width, mant_bits, chunk, out):
    """Inverse of :func:`symbolize` + :func:`encode_chunks`: writes bit patterns into ``out``.

    ``word_start`` / ``bit_start`` have ``n_chunks + 1`` entries (prefix sums). Returns one flag
    per chunk, nonzero where the chunk did not end exactly as encoded (corrupt payload).
    Chunks run in parallel unless :func:`serial` is on for this thread.
    """
    return (_decode_ser if is_serial() else _decode_par)(p, ctx, lut, freq, cum, states, word_start, words,
                                                         bit_start, bitwords, mode, width, mant_bits, chunk, out)


@njit(cache=True, nogil=True)
def _decode_chunk(c, p, ctx, lut, freq, cum, states, word_start, words, bit_start, bitwords,
                  mode, width, mant_bits, chunk, out):
    n = out.shape[0]
    bad = 0
    mask = np.int64((1 << PROB_BITS) - 1)
    nw = words.shape[0]
    nb = bitwords.shape[0]
    nsym = freq.shape[1]
    sign_shift = width - 1 - mant_bits
    lo = c * chunk
    hi = min(n, lo + chunk)
    xs = states[c].copy()
    for j in range(LANES):
        if xs[j] < STATE_LOW or xs[j] >= (np.int64(1) << 32):
            bad = 1
            xs[j] = np.int64(STATE_LOW)
    wp = word_start[c]
    wend = word_start[c + 1]
    bp = bit_start[c]
    bend = bit_start[c + 1]
    acc = np.uint64(0)
    nacc = np.int64(0)
    for i in range(lo, hi):
        k = np.int64(ctx[i])
        lane = (i - lo) & (LANES - 1)
        x = xs[lane]
        slot = x & mask
        s = np.int64(lut[k * (mask + 1) + slot])
        if s >= nsym:
            s = nsym - 1
        x = np.int64(freq[k, s]) * (x >> PROB_BITS) + slot - np.int64(cum[k, s])
        if x < STATE_LOW:
            j = min(max(wp, np.int64(0)), nw - 1)
            x = (x << 16) | np.int64(words[j])
            wp += 1
        xs[lane] = x
        if mode == 0:
            if s < 4:
                nr = np.int64(0)
                hib = s
            else:
                nr = (s - 4) // 4
                hib = (4 | ((s - 4) & 3)) << nr
        else:
            nr = np.int64(mant_bits)
            hib = s << mant_bits
        if nacc < nr:
            j = min(max(bp, np.int64(0)), nb - 1)
            acc |= np.uint64(bitwords[j]) << np.uint64(nacc)
            nacc += 32
            bp += 1
        rv = np.int64(acc & np.uint64((np.int64(1) << nr) - 1))
        acc >>= np.uint64(nr)
        nacc -= nr
        pv = np.int64(p[i])
        if mode == 0:
            u = hib | rv
            r = (u >> 1) ^ (-(u & 1))
            o = _wrap(_ordinal(pv, width) + r, width)
            v = _ordinal(o, width)
        else:
            flip = np.int64(1) if pv < 0 else np.int64(0)
            ub = (hib ^ (flip << (sign_shift + mant_bits))) | rv
            v = ub - ((ub >> (width - 1)) << width)  # sign-extend
        out[i] = v
    for j in range(LANES):
        if xs[j] != STATE_LOW:
            bad = 1
    if wp != wend or bp != bend:
        bad = 1
    return bad


@njit(cache=True, nogil=True)
def exponents(bits, width, mant_bits):
    """The biased exponent field of every element of an int view (int16)."""
    out = np.empty(bits.shape[0], np.int16)
    emask = (np.int64(1) << (width - 1 - mant_bits)) - 1
    for i in range(bits.shape[0]):
        out[i] = (np.int64(bits[i]) >> mant_bits) & emask
    return out


@njit(cache=True, nogil=True)
def buckets_into(src, lo, n_ctx, special, out):
    """Fill ``out`` (uint8) with the context buckets ``clip(src - lo, 1, n_ctx - 1)``, 0 where ``src <= special``
    (the caller allocates: :func:`tpde_hf.checkpoints.enc_features.buckets`)."""
    top = max(1, n_ctx - 1)
    for i in range(src.shape[0]):
        v = np.int64(src[i])
        if v <= special or n_ctx == 1:
            out[i] = 0
        else:
            out[i] = min(max(v - lo, 1), top)
