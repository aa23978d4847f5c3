"""Process-wide worker pools for compiled kernels that release the GIL.

Several codecs split one call into jobs that run on every core (the kernels drop the GIL, so threads scale).
Starting threads per call costs more than small jobs, so each codec keeps one :class:`WorkerPool` for the
process. The pool is created on first use, grows when a call asks for more workers, and is forgotten in a forked
child (the child inherits the executor object but not its threads, so submitting to it would hang forever).

Each codec keeps its *own* pool on purpose: a job of one codec may call another codec, and a job that waits on a
job queued behind it in the same pool could deadlock once every worker waits.

Example::

    from tpde_hf.threads import WorkerPool

    POOL = WorkerPool("tpde-codec")
    POOL.run(pow, [(2, 10), (3, 3)])          # [1024, 27]: the calling thread runs the first job
    POOL.map(abs, [-1, -2, 3], workers=2)     # [1, 2, 3]
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_ALL: weakref.WeakSet[WorkerPool] = weakref.WeakSet()


class WorkerPool:
    """A lazily started, growable, fork-safe thread pool named ``prefix`` (the threads' name prefix)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        _ALL.add(self)

    def executor(self, workers: int) -> ThreadPoolExecutor:
        """The pool's executor with at least ``workers`` threads (a smaller one is replaced; its threads finish
        what they hold and exit)."""
        with self._lock:
            ex = self._executor
            if ex is None or ex._max_workers < workers:  # noqa: SLF001 - grow the pool when asked for more
                ex = self._executor = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix=self.prefix)
            return ex

    def run(self, fn: Callable[..., Any], jobs: Sequence[tuple]) -> list[Any]:
        """``[fn(*job) for job in jobs]``, the first job on the calling thread (instead of waiting idle) and the
        others on the pool. Exceptions propagate, the first job's before the others'."""
        if len(jobs) <= 1:
            return [fn(*job) for job in jobs]
        ex = self.executor(len(jobs) - 1)
        futures = [ex.submit(fn, *job) for job in jobs[1:]]
        first = fn(*jobs[0])
        return [first] + [f.result() for f in futures]

    def map(self, fn: Callable[[Any], Any], items: Iterable[Any], workers: int | None = None) -> list[Any]:
        """``[fn(x) for x in items]`` on ``workers`` pool threads (default: one per core), in order."""
        return list(self.executor(workers or os.cpu_count() or 1).map(fn, items))

    def _forget(self) -> None:
        self._executor = None
        self._lock = threading.Lock()  # a lock held by a parent thread at fork() stays held in the child


def _forget_all_in_child() -> None:
    for pool in list(_ALL):
        pool._forget()  # noqa: SLF001


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_all_in_child)
