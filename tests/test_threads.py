"""The process-wide worker pools (tpde_hf.threads): order, the caller's share, growth, errors, fork safety."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from tpde_hf.threads import WorkerPool


def test_run_keeps_order_and_runs_the_first_job_on_the_caller() -> None:
    pool = WorkerPool("test-run")
    names = pool.run(lambda i: (i, threading.current_thread().name), [(i,) for i in range(5)])
    assert [i for i, _ in names] == list(range(5))
    assert names[0][1] == threading.current_thread().name
    assert all(name.startswith("test-run") for _, name in names[1:])


def test_run_of_one_or_no_job_starts_no_thread() -> None:
    pool = WorkerPool("test-one")
    assert pool.run(lambda x: x + 1, [(1,)]) == [2]
    assert pool.run(lambda x: x, []) == []
    assert pool._executor is None


def test_the_pool_grows_when_asked_for_more_workers() -> None:
    pool = WorkerPool("test-grow")
    small = pool.executor(1)
    assert pool.executor(1) is small
    big = pool.executor(3)
    assert big is not small and big._max_workers == 3
    assert pool.executor(2) is big


def test_map_keeps_order_and_errors_propagate() -> None:
    pool = WorkerPool("test-map")
    assert pool.map(lambda x: x * x, range(20), workers=3) == [x * x for x in range(20)]

    def boom(i: int) -> int:
        if i == 3:
            raise ValueError("job 3")
        return i

    with pytest.raises(ValueError, match="job 3"):
        pool.run(boom, [(i,) for i in range(6)])
    with pytest.raises(ValueError, match="job 3"):
        pool.map(boom, range(6))


_CHILD = r"""
import os, sys
from tpde_hf.threads import WorkerPool
pool = WorkerPool("forked")
assert pool.map(abs, [-1, -2, -3], workers=2) == [1, 2, 3]
pid = os.fork()
if pid == 0:
    # the inherited executor has no threads in the child: a pool that kept it would hang here
    ok = pool._executor is None and pool.map(abs, [-4, -5], workers=2) == [4, 5]
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_a_fresh_pool() -> None:
    done = subprocess.run([sys.executable, "-c", _CHILD], timeout=60, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
