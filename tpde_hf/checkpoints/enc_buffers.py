"""Reused buffers for one tensor's large temporaries in the pack (contexts, predictions, Adam features).

On this VM a fresh array of tens of MB costs about as much system time (page faults, unmapping) as the loop that
fills it. Inside :func:`scratch`, :func:`empty` hands out buffers that earlier blocks gave back; outside, it is
``np.empty``. :func:`release_scratch` drops the free buffers between packs (bounded memory).

Example::

    with scratch():
        p = empty(n, np.float32)   # reused, valid only inside the block
    release_scratch()
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import numpy as np

_pool_lock = threading.Lock()
_pool: list[np.ndarray] = []  # free buffers (uint8), reused by any thread inside scratch()
_local = threading.local()
_POOL_MIN = 1 << 20  # smaller arrays come from malloc, whose own free lists serve them without page faults


@contextlib.contextmanager
def scratch() -> Iterator[None]:
    """Within this block, this thread's large temporaries (:func:`empty`: contexts, predictions, features) come
    from a pool of buffers that earlier blocks gave back. Why: a fresh array of tens of MB costs page faults
    and an unmap when it is freed, about as much CPU as the loop that fills it (measured: a third of a pack's
    CPU was system time). Nothing made inside may be used after the block (the buffers are reused)."""
    taken: list[np.ndarray] = []
    prev = getattr(_local, "taken", None)
    _local.taken = taken
    try:
        yield
    finally:
        _local.taken = prev
        with _pool_lock:
            _pool.extend(taken)


def empty(n: int, dtype) -> np.ndarray:
    """``np.empty(n, dtype)``, from the pool inside :func:`scratch` (on this thread), else fresh."""
    dt = np.dtype(dtype)
    nbytes = int(n) * dt.itemsize
    taken = getattr(_local, "taken", None)
    if taken is None or nbytes < _POOL_MIN:
        return np.empty(n, dt)
    with _pool_lock:
        fits = [i for i, b in enumerate(_pool) if b.size >= nbytes]
        buf = _pool.pop(min(fits, key=lambda i: _pool[i].size)) if fits else None
    if buf is None:
        buf = np.empty(nbytes, np.uint8)
    taken.append(buf)
    return buf[:nbytes].view(dt)


def release_scratch() -> int:
    """Drop the pool's free buffers (bounded memory between packs); returns the bytes released."""
    with _pool_lock:
        freed = sum(b.size for b in _pool)
        _pool.clear()
    return freed
