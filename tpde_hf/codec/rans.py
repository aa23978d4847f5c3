"""Interleaved rANS over independent lanes, vectorized over lanes in torch.

Coder state is a 32-bit integer ``x`` in ``[2**16, 2**32)``; renormalization moves one 16-bit word
at a time, and every step moves at most one word. Each context has its own frequency table
quantized to ``2**prob_bits``.

Lane ``j`` of a tensor with ``NL`` lanes owns the elements ``j, j + NL, j + 2*NL, ...`` of the
flattened weight, so step ``e`` of all lanes touches one contiguous run of elements: coalesced
on a GPU and a plain slice on a CPU. The decoder starts from the stored final encoder state of each
lane, reads its words front to back, and must end on exactly ``2**16`` with every word consumed:
a built-in integrity check on top of the checksum.

A padding position uses the *identity context* (index ``n_ctx``): one symbol of frequency
``2**prob_bits``, which leaves the state unchanged and emits nothing.
"""

from __future__ import annotations

import numpy as np
import torch

STATE_LOW = 1 << 16
WORD_BITS = 16
WORD_MASK = (1 << WORD_BITS) - 1


def quantize_frequencies(counts: torch.Tensor, prob_bits: int) -> torch.Tensor:
    """Scale per-context symbol counts ``[n_ctx, n_sym]`` to frequencies summing to ``2**prob_bits``.

    Every symbol that occurs keeps a frequency of at least 1, so it stays encodable. A context that
    never occurs gets all its mass on symbol 0 (a valid, unused table). Surplus mass goes to, and a
    deficit comes from, the most frequent symbols first (ties in symbol order). numpy, not torch:
    it runs once per tensor on small tables, where torch's per-op overhead dominated.
    """
    total_mass = 1 << prob_bits
    cnt_all = counts.numpy().astype(np.int64) if isinstance(counts, torch.Tensor) else np.asarray(counts, np.int64)
    freq = np.zeros_like(cnt_all)
    for ctx in range(cnt_all.shape[0]):
        cnt = cnt_all[ctx]
        total = int(cnt.sum())
        if total == 0:
            freq[ctx, 0] = total_mass
            continue
        f = (cnt * total_mass) // total
        f[(cnt > 0) & (f == 0)] = 1
        diff = total_mass - int(f.sum())
        order = np.argsort(-cnt, kind="stable")
        if diff > 0:
            f[order[0]] += diff
        else:
            for s in order.tolist():  # take the surplus from the most frequent symbols first
                if diff == 0:
                    break
                take = min(-diff, int(f[s]) - 1)
                f[s] -= take
                diff += take
        freq[ctx] = f
    return torch.from_numpy(freq)


def with_identity_context(freq: torch.Tensor, prob_bits: int) -> torch.Tensor:
    ident = torch.zeros((1, freq.shape[1]), dtype=torch.int64)
    ident[0, 0] = 1 << prob_bits
    return torch.cat((freq.to(torch.int64), ident))


def decode_luts(freq: torch.Tensor, prob_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lookup tables indexed by ``ctx << prob_bits | slot``.

    Returns ``(step_lut, sym_lut)``: ``step_lut`` is uint32 ``freq | (slot - cum) << 16`` so that a
    decode step is one gather and ``x = freq * (x >> prob_bits) + (slot - cum)``; ``sym_lut`` (int64)
    gives the symbol, looked up once for all steps after the loop.
    """
    n_ctx, n_sym = freq.shape
    total = 1 << prob_bits
    cum = torch.cumsum(freq, dim=1) - freq
    sym = torch.repeat_interleave(
        torch.arange(n_sym, dtype=torch.int64).repeat(n_ctx), freq.flatten()
    ).view(n_ctx, total)
    f = torch.gather(freq, 1, sym)
    bias = torch.arange(total, dtype=torch.int64) - torch.gather(cum, 1, sym)
    step = (f | (bias << 16)).flatten().numpy().astype(np.uint32)
    return torch.from_numpy(step), sym.flatten()


def element_tables(freq: torch.Tensor, ctx_sym: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Frequency and cumulative frequency of each element's ``ctx * n_symbols + symbol``, as uint32."""
    cum = torch.cumsum(freq, dim=1) - freq
    flat = ctx_sym.numpy()
    return freq.numpy().astype(np.uint32).ravel().take(flat), cum.numpy().astype(np.uint32).ravel().take(flat)


def encode_lanes(
    f_all: np.ndarray, c_all: np.ndarray, prob_bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Encode lanes given every element's symbol frequency ``f_all[steps, lanes]`` and start ``c_all``.

    Padding positions carry ``f = 2**prob_bits, c = 0`` (the identity context). Returns
    ``(final_states, words_per_lane, words)``, with ``words`` concatenated lane by lane in decoder
    order. The loop runs in numpy uint32: at a few thousand lanes its per-call overhead is a third
    of torch's, and the rANS invariants keep every intermediate below ``2**32``.
    """
    steps, lanes = f_all.shape
    # Renormalize when x >= x_max = ((STATE_LOW >> prob_bits) << 16) * f. Compare against x_max - 1
    # in wrapping uint32: a symbol of frequency 2**prob_bits (x_max = 2**32) then never renormalizes.
    xmax_m1 = (f_all << np.uint32(32 - prob_bits)) - np.uint32(1)
    x = np.full(lanes, STATE_LOW, dtype=np.uint32)
    qf = np.empty(lanes, dtype=np.float64)
    words = np.empty((steps, lanes), dtype=np.uint16)
    emitted = np.empty((steps, lanes), dtype=bool)
    q = np.empty(lanes, dtype=np.uint32)
    pb, wb = np.uint32(prob_bits), np.uint32(WORD_BITS)
    for e in range(steps - 1, -1, -1):
        emit = emitted[e]
        np.greater(x, xmax_m1[e], out=emit)
        np.copyto(words[e], x, casting="unsafe")  # low 16 bits
        np.right_shift(x, wb * emit, out=x)
        # float64 division is correctly rounded, so exact multiples never round down.
        np.divide(x, f_all[e], out=qf)
        np.copyto(q, qf, casting="unsafe")
        x -= q * f_all[e]
        x += c_all[e]
        x += q << pb
    lane_words = words.T[emitted.T]  # lane-major, ascending steps: the decoder's reading order
    return (
        torch.from_numpy(x.astype(np.int64)),
        torch.from_numpy(emitted.sum(axis=0).astype(np.int64)),
        torch.from_numpy(lane_words.astype(np.int64)),
    )


def decode_lanes(
    ctx_base: np.ndarray,
    states: torch.Tensor,
    word_start: torch.Tensor,
    words: torch.Tensor,
    step_lut: np.ndarray,
    prob_bits: int,
) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Run the decoder; ``ctx_base[steps, lanes]`` (uint32) is each element's ``ctx << prob_bits``.

    ``words`` must end with one sentinel entry so that a clamped read past the end is harmless.
    Returns ``(lut_index[steps, lanes], final_states, final_word_pointers)``: the symbols are
    ``sym_lut[lut_index]``; callers check that the states equal ``STATE_LOW`` and the pointers
    the lane ends. All loop arithmetic is uint32, which the rANS invariants keep in range.
    """
    steps, lanes = ctx_base.shape
    mask = np.uint32((1 << prob_bits) - 1)
    last = words.numel() - 1
    lut = step_lut
    words_n = words.numpy().astype(np.uint32)
    x = states.numpy().astype(np.uint32)
    ptr = word_start.numpy().astype(np.int64)
    out = np.empty((steps, lanes), dtype=np.uint32)
    need = np.empty(lanes, dtype=bool)
    p = np.empty(lanes, dtype=np.uint32)
    t = np.empty(lanes, dtype=np.uint32)
    w = np.empty(lanes, dtype=np.uint32)
    at = np.empty(lanes, dtype=np.int64)
    pb, lo, wb = np.uint32(prob_bits), np.uint32(STATE_LOW), np.uint32(WORD_BITS)
    for e in range(steps):
        idx = out[e]
        np.bitwise_and(x, mask, out=idx)
        idx += ctx_base[e]
        lut.take(idx, out=p)
        np.right_shift(x, pb, out=x)
        np.bitwise_and(p, 0xFFFF, out=t)
        x *= t
        np.right_shift(p, 16, out=t)
        x += t
        np.less(x, lo, out=need)
        np.minimum(ptr, last, out=at)
        words_n.take(at, out=w)
        w *= need
        np.left_shift(x, wb * need, out=x)
        x |= w
        ptr += need
    return (
        out,
        torch.from_numpy(x.astype(np.int64)),
        torch.from_numpy(ptr),
    )
