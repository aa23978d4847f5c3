"""Variable-width raw bit fields in a stream of 32-bit words (LSB first).

Field ``i`` of width ``n_i <= 32`` starts at bit ``sum(n_j for j < i)``; bit ``b`` of the stream is
bit ``b % 32`` of word ``b // 32``. A reader takes the 64-bit window ``w[k] | w[k+1] << 32`` so any
field is one shift and one mask away, the same on a GPU as here.
"""

from __future__ import annotations

import numpy as np
import torch


def n_words(total_bits: int) -> int:
    return -(-total_bits // 32)


def pack_fields(values: torch.Tensor, widths: torch.Tensor, offsets: torch.Tensor, total_bits: int) -> torch.Tensor:
    """Write ``values`` (int64, each ``< 2**width``) at bit ``offsets``; returns int64 words in [0, 2**32)."""
    words = torch.zeros(n_words(total_bits) + 1, dtype=torch.int64)
    keep = widths > 0
    values, offsets = values[keep], offsets[keep]
    k = offsets >> 5
    sh = offsets & 31
    shifted = values << sh  # < 2**63: width <= 32, shift <= 31
    # Fields never overlap, so adding is the same as OR-ing.
    words.index_add_(0, k, shifted & 0xFFFFFFFF)
    words.index_add_(0, k + 1, shifted >> 32)
    return words[:-1]


def read_fields(words: torch.Tensor, widths: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Read fields of ``widths`` at ``offsets`` from int64 ``words`` (values in [0, 2**32))."""
    padded = torch.cat((words, torch.zeros(2, dtype=torch.int64)))
    k = (offsets >> 5).clamp(max=padded.numel() - 2)
    window = padded[k] | (padded[k + 1] << 32)
    return (window >> (offsets & 31)) & ((1 << widths) - 1)


def read_fields_np(words: np.ndarray, widths: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """numpy twin of :func:`read_fields` for the CPU decoder's hot path (int64 in, int64 out)."""
    padded = np.concatenate((words.astype(np.uint64), np.zeros(2, dtype=np.uint64)))
    k = np.minimum(offsets >> 5, padded.size - 2)
    window = padded.take(k)
    k += 1
    window |= padded.take(k) << np.uint64(32)
    window >>= (offsets & 31).astype(np.uint64)
    window &= _LOW_MASKS.take(widths)
    return window.view(np.int64)


_LOW_MASKS = (np.uint64(1) << np.arange(64, dtype=np.uint64)) - np.uint64(1)
