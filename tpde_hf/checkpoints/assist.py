"""Let the waiting training thread help the packing thread finish.

The callback packs on one background thread at nice 19, so training wins the cores. When Trainer
reaches the next save while that pack is still running it must wait; the cores are then idle but for
the one packing thread. :class:`Assist` lets the waiting thread (normal priority) take the remaining
tensors of the pack (:meth:`help`), each on serial kernels, so the rest of the pack runs on two cores.
It also puts the packing thread back at normal priority while anyone waits for it.

Example::

    assist = Assist()
    encode_entry(cur, ref, runner=assist)       # on the packing thread (``assist.fork`` inside a job)
    assist.help(thread.is_alive)                # on the training thread, in wait()
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any

from tpde_hf.checkpoints import kernels as K

logger = logging.getLogger(__name__)


class _Batch:
    def __init__(self, n: int):
        self.results: list[Any] = [None] * n
        self.error: BaseException | None = None
        self.pending = n


class Assist:
    """A queue of independent jobs (the tensors of one coding stage) that helpers may take."""

    def __init__(self, workers: int | None = None):
        self._cv = threading.Condition()
        self._jobs: collections.deque[tuple[_Batch, int, Callable[[], Any]]] = collections.deque()
        self.workers = workers or max(1, min(os.cpu_count() or 1, 8))
        self.owner_tid: int | None = None  # the packing thread's native id (set by it)
        self.helped = 0  # jobs run by helpers (a count for tests and benchmarks)
        self.poll_s = 0.05  # an idle helper looks at ``busy()`` this often (sooner when woken: :meth:`wake`)

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        """``[fn(x) for x in items]``, in order; helpers may run some of them. Called by the owner thread."""
        items = list(items)
        batch = _Batch(len(items))
        with self._cv:
            for i, x in enumerate(items):
                self._jobs.append((batch, i, lambda x=x: fn(x)))
            self._cv.notify_all()
        while True:
            with self._cv:
                if self._jobs:
                    job = self._jobs.popleft()
                elif batch.pending == 0:
                    break
                else:
                    self._cv.wait(0.1)
                    continue
            self._run(job)
        if batch.error is not None:
            raise batch.error
        return batch.results

    __call__ = map  # a runner ``runner(fn, items)`` (e.g. for ``store.encode_entry``)

    def fork(self, fn: Callable[[Any], Any], items: Iterable[Any]) -> list[Any]:
        """``[fn(x) for x in items]`` from inside a job, on any thread: the items go to the front of the queue,
        where idle helpers take them first; the calling thread runs the rest of its own (never another job:
        the job it is part of waits for it) and then waits for those a helper took."""
        items = list(items)
        if len(items) <= 1:
            return [fn(x) for x in items]
        batch = _Batch(len(items))
        jobs = [(batch, i, lambda x=x: fn(x)) for i, x in enumerate(items)]
        with self._cv:
            self._jobs.extendleft(reversed(jobs))
            self._cv.notify_all()
        while True:
            with self._cv:
                mine = next((j for j in self._jobs if j[0] is batch), None)
                if mine is not None:
                    self._jobs.remove(mine)
                elif batch.pending == 0:
                    break
                else:
                    self._cv.wait(0.1)
                    continue
            self._run(mine)
        if batch.error is not None:
            raise batch.error
        return batch.results

    def _run(self, job: tuple[_Batch, int, Callable[[], Any]]) -> None:
        batch, i, call = job
        try:
            if batch.error is None:
                batch.results[i] = call()
        except BaseException as exc:  # noqa: BLE001 - re-raised by map() on the owner thread
            batch.error = exc
        finally:
            with self._cv:
                batch.pending -= 1
                self._cv.notify_all()

    def help(self, busy: Callable[[], bool]) -> None:
        """Run queued jobs on this thread and ``workers - 2`` more (threads it starts inherit its priority)
        until ``busy()`` is false. Raises the owner thread's priority back to normal (it stays so until it ends)."""
        self._boost(True)
        extra = [threading.Thread(target=self._help_loop, args=(busy,), name="tpde-help", daemon=True)
                 for _ in range(max(0, self.workers - 2))]
        for t in extra:
            t.start()
        try:
            self._help_loop(busy)
        finally:
            for t in extra:
                t.join()

    def _help_loop(self, busy: Callable[[], bool]) -> None:
        with K.serial(True):  # numba's shared pool is not re-entrant: one tensor per thread
            while True:
                with self._cv:
                    if self._jobs:
                        job = self._jobs.popleft()
                    elif not busy():
                        return
                    else:
                        self._cv.wait(self.poll_s)
                        continue
                self.helped += 1
                self._run(job)

    def wake(self) -> None:
        """Wake the helping threads now, e.g. as the pack they help ends (between jobs they look at ``busy()``
        only every ``poll_s``: measured 0.02-0.04 s of a 0.74 s wait at a save)."""
        with self._cv:
            self._cv.notify_all()

    def _boost(self, on: bool) -> None:
        # only ever raised: the owner thread ends with its pack (a later pack lowers its own thread again)
        if self.owner_tid is None or not on:
            return
        try:
            if hasattr(os, "sched_setscheduler") and os.sched_getscheduler(self.owner_tid) != os.SCHED_OTHER:
                os.sched_setscheduler(self.owner_tid, os.SCHED_OTHER, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, self.owner_tid, 0)
        except (AttributeError, OSError) as exc:  # not permitted (raising priority needs CAP_SYS_NICE)
            logger.debug("tpde: cannot change the packing thread's priority (%s)", exc)
