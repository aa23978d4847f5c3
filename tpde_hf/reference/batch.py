"""Decode many ``ref-ord`` tensors as one job list: compiled calls over batches of chunks, without the GIL.

A load decodes hundreds of tensors. Decoding them one Python call each costs Python work per tensor on the
decode threads, and each of those threads must win the GIL back from the loading thread (which runs Python
the whole time) after every compiled call. Here every tensor is first checked and prepared once
(:func:`tpde_hf.reference.codec.prepare_ord`: header, reference, tables), its tables and streams are
concatenated into a few shared arrays, and the work is cut into *units* (one rANS chunk of one tensor). A
decode thread claims a batch of consecutive units (a few million weights) and decodes it in one call of
:func:`tpde_hf.reference.kernels.decode_units`, which holds no GIL; it takes the GIL only between batches, to
claim the next one. Each tensor's checks (chunk statuses, xxh3 of the result) run in :meth:`BatchDecode.result`,
on the thread that asks for it.

Units are in the order the load asks for tensors, so the first tensors are ready first; any number of
threads may run :meth:`BatchDecode.work` at once. Tensors can be added in groups while threads already decode
the first ones (the preparation is Python: it shares the GIL with the loading thread, the decode does not).

Example::

    batch = BatchDecode()
    threading.Thread(target=batch.work).start()
    first = batch.add([prepare_ord(blob, reference, key) for key, blob, reference in tensors])
    batch.close()
    out = batch.result(first[0])   # waits for it; raises its TpdeFormatError if it was damaged
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import torch

from tpde_hf.reference import kernels as K
from tpde_hf.reference.codec import OrdJob
from tpde_hf.reference.fastload import call

#: weights per batch: ~50 ms of decode, so a decode thread takes the GIL a few times per second, not per tensor
BATCH_WEIGHTS = 1 << 23
#: the last batch of a closed list is split in halves down to this many units (chunks) per claim
TAIL_UNITS = 8


def _offsets(sizes: Sequence[int]) -> np.ndarray:
    out = np.zeros(len(sizes) + 1, np.int64)
    np.cumsum(sizes, out=out[1:])
    return out


class _Segment:
    """Tensors added together: their kernel job table, units and statuses (arrays never reallocated, so a batch
    running on another thread keeps writing into the statuses that are read)."""

    def __init__(self, jobs: Sequence[OrdJob], first: int, batch_weights: int):
        n = len(jobs)
        self.first = first  # global index of jobs[0]
        self.keep: list[list[np.ndarray]] = []  # per tensor, the arrays its table row points at
        table = np.zeros((max(n, 1), K.J_FIELDS), np.int64)
        for i, j in enumerate(jobs):
            words, raw = j.stream("words", spare_in_blob=True), j.stream("raw", spare_in_blob=True)
            arrays = [np.ascontiguousarray(a) for a in (*j.tables, words, raw, j.word_start, j.raw_start, j.states)]
            ctx, lut, fc, sym, words, raw, wstart, rstart, states = arrays  # the kernel reads them by address
            table[i] = [j.ref.view(-1).data_ptr(), j.out.view(-1).data_ptr(), j.out.numel(), j.width, j.shift,
                        j.emask, j.chunk, lut.size >> 12, ctx.ctypes.data, lut.ctypes.data, fc.ctypes.data,
                        sym.ctypes.data, words.ctypes.data, words.size - 1, raw.ctypes.data, raw.size - 1,
                        wstart.ctypes.data, rstart.ctypes.data, states.ctypes.data, j.n_chunks]
            self.keep.append(arrays)
        self.table = table
        counts = [j.n_chunks for j in jobs]
        self.first_unit = _offsets(counts)
        n_units = int(self.first_unit[-1])
        self.unit_job = np.repeat(np.arange(n, dtype=np.int64), counts)
        self.unit_chunk = np.arange(n_units, dtype=np.int64) - np.repeat(self.first_unit[:-1], counts)
        self.status = np.full(max(n_units, 1), -1, np.int64)
        cuts, acc = [0], 0  # batches of whole chunks, about batch_weights weights each, in load order
        for u, w in enumerate(np.repeat([j.chunk for j in jobs], counts).tolist()):
            acc += w
            if acc >= batch_weights:
                cuts.append(u + 1)
                acc = 0
        if cuts[-1] != n_units:
            cuts.append(n_units)
        self.batches = list(zip(cuts[:-1], cuts[1:], strict=True))
        self.left = counts[:]  # units not yet decoded, per tensor


class BatchDecode:
    """Tensors prepared by :func:`tpde_hf.reference.codec.prepare_ord`, decoded as one job list (see the module
    docstring). Tensors are :meth:`add` ed in groups (decoding starts with the first group) and numbered in the
    order they were added; :meth:`close` says no more will come."""

    def __init__(self, batch_weights: int = BATCH_WEIGHTS):
        self._batch_weights = batch_weights
        self._segments: list[_Segment] = []
        self._queue: list[tuple[_Segment, int, int]] = []  # batches not yet claimed
        self._next = 0
        self.jobs: list[OrdJob | None] = []
        self._where_done: dict[int, tuple[_Segment, int]] = {}  # decoded, not yet checked and handed out
        self._done: list[threading.Event] = []
        self._cond = threading.Condition()
        self._closed = False
        self._cancelled = False

    def add(self, jobs: Sequence[OrdJob]) -> list[int]:
        """Queue ``jobs``; their indices for :meth:`result`."""
        with self._cond:
            first = len(self.jobs)
            seg = _Segment(jobs, first, self._batch_weights)
            self._segments.append(seg)
            self.jobs.extend(jobs)
            self._done.extend(threading.Event() for _ in jobs)
            self._queue.extend((seg, lo, hi) for lo, hi in seg.batches)
            self._cond.notify_all()
        for i, c in enumerate(seg.left):
            if c == 0:
                self._finish(seg, i)
        return list(range(first, first + len(jobs)))

    def close(self) -> None:
        """No more :meth:`add`: :meth:`work` returns once the queue is empty."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _finish(self, seg: _Segment, i: int) -> None:
        """Tensor ``i`` of ``seg`` has all its units decoded: wake whoever waits for it. Its checks (statuses, xxh3)
        run in :meth:`result`, on the thread that asks: a decode thread here would need the GIL for them while
        the loading thread holds it (each wait is up to a switch interval, 5 ms)."""
        self._where_done[seg.first + i] = (seg, i)
        self._done[seg.first + i].set()

    def work(self) -> None:
        """Decode batches until the list is closed and empty, or cancelled (any number of threads at once)."""
        while True:
            with self._cond:
                while not self._cancelled and self._next >= len(self._queue) and not self._closed:
                    self._cond.wait()
                if self._cancelled or self._next >= len(self._queue):
                    return
                seg, lo, hi = self._queue[self._next]
                if self._closed and self._next == len(self._queue) - 1 and hi - lo >= 2 * TAIL_UNITS:
                    # the last batch: take half and leave half, so that the threads finish together (the load
                    # waits for the last tensor; a whole batch left to one thread is up to ~50 ms alone)
                    mid = (lo + hi) // 2
                    self._queue[self._next] = (seg, mid, hi)
                    hi = mid
                else:
                    self._next += 1
            try:
                call(K.decode_units, lo, hi, seg.unit_job, seg.unit_chunk, seg.table, seg.status)
            except Exception:  # not a damaged stream (that is a status): leave these tensors to the caller
                seg.status[lo:hi] = -2
            finished = []
            with self._cond:
                jobs = seg.unit_job[lo:hi]
                for i in np.unique(jobs).tolist():
                    seg.left[i] -= int(np.count_nonzero(jobs == i))
                    if seg.left[i] == 0:
                        finished.append(i)
            for i in finished:
                self._finish(seg, i)

    def result(self, i: int) -> torch.Tensor | None:
        """Tensor ``i`` once decoded and checked (waits for it; once per tensor); raises its
        :class:`~tpde_hf.errors.TpdeFormatError` if it is damaged; None if it was not decoded (cancelled, or the
        kernel could not run)."""
        self._done[i].wait()
        found = self._where_done.pop(i, None)
        job = self.jobs[i]
        if found is None or job is None:
            return None
        seg, k = found
        lo, hi = int(seg.first_unit[k]), int(seg.first_unit[k + 1])
        try:
            if (seg.status[lo:hi] < 0).any():  # not decoded (see work): the caller decodes it itself
                return None
            return job.finish(seg.status[lo:hi])
        finally:
            self.jobs[i] = None  # its tables, streams and reference are no longer needed
            seg.keep[k] = []

    def cancel(self) -> None:
        """Claim no further batch (the load failed); batches already running finish."""
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()
            queued = self._queue[self._next :]
            self._next = len(self._queue)
        for seg, lo, hi in queued:  # never claimed: their tensors end as not decoded (None)
            for i in np.unique(seg.unit_job[lo:hi]).tolist():
                self._done[seg.first + i].set()  # arrays kept: a running batch may still read them
