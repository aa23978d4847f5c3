"""Bin tables of the ``narrow-rans`` codec kept *across tensors*: every bin is built once per distinct scale.

A bin depends only on (dtype, grid, scale, level) (see :mod:`.bins`), and the tensors of one model share most
of their scales: MiniLM's 37 weights hold 16.2k distinct fp16 scales counted tensor by tensor, but only 1.6k
distinct ones in all. A :class:`BinTable` gives each scale a *slot* (by its fp16 bit pattern) the first time a
tensor uses it, and builds each (slot, level) bin the first time a tensor needs it; later tensors only read.

:func:`shared_bins` keeps one table per (dtype, grid) for the calling thread until the block ends; a load's
decode workers (:mod:`tpde_hf.loading.storage_prefetch`) pass one dict of tables to all of theirs, so that a
bin is built once per load, not once per worker. A table is shared safely: :meth:`BinTable.prepare` adds the
scales and builds the bins under the table's lock and hands back the arrays of that moment; a later growth
allocates new arrays (the old ones, which a decode in flight reads, stay as they were), and a later build writes
only bins that no earlier caller reads (not yet built, so not needed by any decode in flight). Outside such a
block the codec builds a fresh table per tensor, on all its threads, as before.
The tables' *values* never change the bytes: a table built here equals the per-tensor one
(tests compare the decoded weights and the layout fixtures).

Example::

    with shared_bins():
        w1 = decode_weight(parts1, "a.weight")   # builds the bins of a's scales
        w2 = decode_weight(parts2, "b.weight")   # builds only the bins of scales that a did not use
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from tpde_hf.codec.storage import bins as K

FIRST_CAPACITY = 2048  # slots of a new table (MiniLM's 37 weights use 1.6k scales): it doubles when full
MAX_SLOTS = 1 << 14  # a table past this many scales starts afresh (bounds its memory: ~16 KB of tables a slot)
_local = threading.local()
_new_lock = threading.Lock()


class BinTable:
    """The bins of every scale that one thread's tensors of one (dtype, grid) used (see the module docstring).

    ``cache`` is the :func:`bins.new_cache` tuple over ``capacity`` slots; ``uscales[slot]`` the slot's scale
    (float32). Example: ``sids = table.slots(s16); table.build(q, z, sids, 7)``.
    """

    def __init__(self, width: int, mb: int, tz: int, lut: np.ndarray, capacity: int | None = None):
        self.width, self.mb, self.tz, self.lut = width, mb, tz, lut
        self.lock = threading.RLock()
        self.slot_of = np.full(1 << 16, -1, dtype=np.int32)  # fp16 scale pattern -> slot
        self.n = 0
        capacity = capacity or FIRST_CAPACITY
        self.uscales = np.zeros(capacity, dtype=np.float32)
        self.cache = K.new_cache(capacity)

    @property
    def capacity(self) -> int:
        return self.uscales.size

    def prepare(self, s16: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, tuple, np.ndarray]:
        """``(slots, cache, uscales)`` for a tensor's groups (scales' uint16 patterns ``s16``, zero points ``z``):
        :meth:`slots` then :meth:`build`, under the lock; the arrays stay valid (and unchanged where this tensor
        reads them) whatever other threads add later. Example: ``sids, cache, us = table.prepare(s16, z)``."""
        with self.lock:
            sids = self.slots(s16)
            return sids, self.build(z, sids), self.uscales

    def slots(self, s16: np.ndarray) -> np.ndarray:
        """Each group's slot (int32, the shape of ``s16``: the scales' uint16 patterns), new scales added."""
        with self.lock:
            return self._slots(s16)

    def _slots(self, s16: np.ndarray) -> np.ndarray:
        sl = self.slot_of[s16]
        if bool((sl < 0).any()):
            new = np.unique(s16[sl < 0])
            if self.n + new.size > self.capacity:
                self._grow(self.n + new.size)
            self.slot_of[new] = np.arange(self.n, self.n + new.size, dtype=np.int32)
            self.uscales[self.n:self.n + new.size] = new.view(np.float16).astype(np.float32)
            self.n += new.size
            sl = self.slot_of[s16]
        return sl

    def build(self, z: np.ndarray, sids: np.ndarray) -> tuple:
        """Build every bin that a group (zero point ``z``, slot ``sids``) can use, levels ``-z .. 15 - z``, that
        no table holds yet; the cache tuple for the kernels. (Marked by group, not by code: no pass over the
        codes, which the delta decode may then read as they decode; a group uses nearly all 16 levels anyway.)"""
        with self.lock:
            need = np.zeros((self.capacity, K.NLEV), dtype=np.bool_)
            K.mark_group_bins(z, sids, need)
            K.build_bins(need, self.uscales, 0, self.n, self.width, self.mb, self.tz, self.lut, self.cache)
            return self.cache

    def _grow(self, at_least: int) -> None:
        """Reallocate for ``at_least`` slots, keeping every built bin (the flat tables have two sections whose
        offsets depend on the capacity: see :func:`bins._where`)."""
        old_n, new_n = self.capacity, max(at_least, 2 * self.capacity)
        old, new = self.cache, K.new_cache(new_n)
        for i in (0, 1, 2, 3, 4, 8, 10):  # per-slot arrays
            new[i][:old_n] = old[i]
        new[9][: old[9].size] = old[9]  # records: per slot, contiguous
        for i, per_lev, zero in ((5, K.NLEV * 8 * K.SMALL, 8 * K.MAXSEG), (6, K.NLEV * K.SMALL * 2, K.MAXSEG * 2)):
            new[i][: old_n * per_lev] = old[i][: old_n * per_lev]
            new[i][new_n * per_lev: new_n * per_lev + old_n * zero] = old[i][old_n * per_lev:]
        uscales = np.zeros(new_n, dtype=np.float32)
        uscales[:old_n] = self.uscales
        self.cache, self.uscales = new, uscales


@contextmanager
def shared_bins(tables: dict | None = None) -> Iterator[None]:
    """Within the block, this thread's decodes share one :class:`BinTable` per (dtype, grid) (nestable): those
    of ``tables`` (a dict that other threads may pass too: they then share the tables), else a dict of its own.
    Example: ``with shared_bins(load_tables): ...`` on every worker of a load."""
    outer = getattr(_local, "tables", None)
    if outer is None:
        _local.tables = {} if tables is None else tables
    try:
        yield
    finally:
        if outer is None:
            _local.tables = None


def active() -> bool:
    """Whether this thread is inside :func:`shared_bins` (:func:`table_for` then gives a table)."""
    return getattr(_local, "tables", None) is not None


def table_for(width: int, mb: int, tz: int, lut: np.ndarray) -> BinTable | None:
    """This thread's shared table for (``width``, ``mb``, ``tz``) inside :func:`shared_bins`, else None."""
    tables = getattr(_local, "tables", None)
    if tables is None:
        return None
    with _new_lock:  # threads that share ``tables`` create each table once
        t = tables.get((width, mb, tz))
        if t is None or t.n > MAX_SLOTS:
            t = tables[(width, mb, tz)] = BinTable(width, mb, tz, lut)
    return t
