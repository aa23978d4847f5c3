"""The encode tasks of a conversion: batched, run on threads or worker processes, journaled for resume.

Weights are batched into tasks of about ``TASK_ELEMENTS`` (:func:`make_tasks`; an expert tensor stored as
3-D is encoded one expert at a time: :func:`encode_units`). Each task writes its own file, reads it back,
decodes it and compares bits with the source (:func:`~tpde_hf.conversion.worker.run_task`). Tasks run on
one thread per core of this process (:class:`_TaskThreads`, the codec drops the GIL) or in worker
processes (:class:`_Pool`); :class:`_Encoding` starts them from a guess while the plan is made, settles
them once the selection is known, and appends each finished task to the journal that ``resume=True``
reads back (:func:`_read_journal`, :func:`_reusable`).

Example::

    tasks = make_tasks(infos, CodecParams(), partial / "tensors", verify=True)
    [len(t.tensors) for t in tasks]   # consecutive weights, about a million per task
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING

from tpde_hf.codec import CodecParams, limit_codec_threads
from tpde_hf.conversion.errors import ConversionError
from tpde_hf.conversion.partial import JOURNAL_NAME
from tpde_hf.conversion.progress import EncodeProgress
from tpde_hf.conversion.report import ConversionReport
from tpde_hf.conversion.selection import Selection
from tpde_hf.conversion.streaming import TensorInfo
from tpde_hf.conversion.worker import EncodeTask, TaskResult, TensorResult, init_worker, run_task
from tpde_hf.format import expert_slice_prefix

if TYPE_CHECKING:
    from tpde_hf.conversion.assembly import _Run

TASK_ELEMENTS = 1 << 20  # weights per encode task: small tensors are batched up to this (a tensor is never split)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def make_tasks(infos: list[TensorInfo], params: CodecParams, folder: Path, verify: bool,
               first_index: int = 0) -> list[EncodeTask]:
    """Batch consecutive weights into tasks of about ``TASK_ELEMENTS`` (deterministic, for resume)."""
    batches: list[list[TensorInfo]] = []
    size = 0
    for info in infos:
        if not batches or size + info.numel > TASK_ELEMENTS:
            batches.append([])
            size = 0
        batches[-1].append(info)
        size += info.numel
    return [EncodeTask(i, batch, params, folder / f"task-{i:05d}.safetensors", verify)
            for i, batch in enumerate(batches, start=first_index)]


def encode_units(selection: Selection, infos: dict[str, TensorInfo]) -> dict[str, list[TensorInfo]]:
    """What the encoder encodes for each selected weight: the weight itself; for an expert tensor stored as 3-D
    (``[E, A, B]``), one 2-D slice per expert, named ``<prefix>.weight`` after its stored prefix
    (:func:`~tpde_hf.format.expert_slice_prefix`) and read as a byte range of the source (the worker transposes
    the ``tpde_expert_t`` ones, :func:`~tpde_hf.format.as_encoded`).

    Example::

        encode_units(sel, infos)["m.experts.down_proj"][3].name  # 'm.experts.down_proj.tpde_expert_t.3.weight'
    """
    out: dict[str, list[TensorInfo]] = {}
    for name in selection.encoded:
        info, role = infos[name], selection.roles.get(name)
        if role is None or role.kind != "experts-3d":
            out[name] = [info]
            continue
        n = info.shape[0]
        step = info.nbytes // n
        out[name] = [TensorInfo(f"{expert_slice_prefix(name, e, role.transposed)}.weight", info.dtype, info.shape[1:],
                                info.begin + e * step, info.begin + (e + 1) * step, info.file) for e in range(n)]
    return out


def _read_journal(path: Path) -> dict[int, TaskResult]:
    """Finished tasks recorded by an earlier run, by task index (a torn last line is skipped)."""
    records: dict[int, TaskResult] = {}
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
            tensors = [TensorResult.from_dict(t) for t in rec["tensors"]]
            records[rec["index"]] = TaskResult(**{**rec, "tensors": tensors})
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line from a crash
    return records


def _reusable(res: TaskResult | None, task: EncodeTask, verify: bool) -> bool:
    """Whether an earlier run's result of ``task`` stands: same tensors, file still there, verified if asked."""
    if res is None or [t.name for t in res.tensors] != [i.name for i in task.tensors] or not Path(res.out).is_file():
        return False
    return not verify or all(t.verified for t in res.tensors)  # an earlier run that skipped verification: redo


class _Encoding:
    """The encode tasks of one conversion: started from a guess, settled once the selection is known.

    Tasks are numbered in the order they are made, and both sets are a function of the headers and
    the options alone, so an interrupted run's journal matches the tasks of its resumption.
    """

    def __init__(self, partial: Path, params: CodecParams, verify: bool, runner: _TaskThreads | _Pool):
        self.folder = partial / "tensors"
        self.folder.mkdir(exist_ok=True)
        self.journal = partial / JOURNAL_NAME
        self.earlier = _read_journal(self.journal)
        self.params, self.verify, self.runner = params, verify, runner
        self.tasks: list[EncodeTask] = []
        self.reused: list[TaskResult] = []
        self.running: dict[Future, EncodeTask] = {}
        self.resumed_names: set[str] = set()  # selected weights whose task an earlier run finished
        self._t0: float | None = None
        self.seconds = 0.0
        self.progress = EncodeProgress()

    def start(self, infos: list[TensorInfo]) -> None:
        """Make tasks of ``infos`` and hand them out, largest first (those an earlier run finished are reused)."""
        tasks = make_tasks(infos, self.params, self.folder, self.verify, first_index=len(self.tasks))
        self.tasks += tasks
        pending = []
        reused_bytes = 0
        for task in tasks:
            if _reusable(self.earlier.get(task.index), task, self.verify):
                self.reused.append(self.earlier[task.index])
                reused_bytes += _task_bytes(task)
            else:
                pending.append(task)
        if pending and self._t0 is None:
            self._t0 = time.perf_counter()
        self.progress.add(sum(_task_bytes(t) for t in tasks), already_done=reused_bytes)
        for task in sorted(pending, key=lambda t: -_task_bytes(t)):
            fut = self.runner.submit(task)
            self.running[fut] = task
            fut.add_done_callback(self._advance)

    def _advance(self, fut: Future) -> None:
        """Move the bar as soon as a task finishes, even while this process is still planning."""
        if not fut.cancelled() and fut.exception() is None:
            self.progress.done(sum(t.source_bytes for t in fut.result().tensors))

    def finish(self, run: _Run, on_tensor: Callable[[TensorResult], None] | None
               ) -> tuple[dict[str, TensorResult], dict[str, Path]]:
        """Drop guessed tasks the selection rejects, start the selected weights not guessed, wait for all."""
        self.runner.use_all_cores()
        units = [u for us in encode_units(run.selection, {i.name: i for i in run.infos}).values() for u in us]
        selected = {u.name for u in units}
        for fut, task in list(self.running.items()):
            if not any(i.name in selected for i in task.tensors) and fut.cancel():
                del self.running[fut]
                self.progress.drop(_task_bytes(task))
        guessed = {i.name for t in self.tasks for i in t.tensors}
        self.start([u for u in units if u.name not in guessed])

        results: dict[str, TensorResult] = {}
        task_files: dict[str, Path] = {}
        for res in self.reused:
            for tr in res.tensors:
                if tr.name in selected:
                    results[tr.name], task_files[tr.name] = tr, Path(res.out)
        self.resumed_names = set(results)
        run.report.resumed_tensors = len(results)

        def finished(res: TaskResult) -> None:
            with open(self.journal, "a") as f:  # one line per task, flushed: the resume point
                f.write(json.dumps({**res.__dict__, "tensors": [t.to_dict() for t in res.tensors]}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            _account_memory(run.report, res)
            for tr in res.tensors:
                if tr.name not in selected:
                    continue  # a wrong guess: encoded, verified and left out
                results[tr.name], task_files[tr.name] = tr, Path(res.out)
                if on_tensor is not None:
                    on_tensor(tr)

        try:
            while self.running:
                ready, _ = wait(self.running, return_when=FIRST_COMPLETED)
                for fut in ready:
                    del self.running[fut]
                    finished(fut.result())
        finally:
            for fut in self.running:
                fut.cancel()
            self.progress.close()
        if self._t0 is not None:
            self.seconds = time.perf_counter() - self._t0
        return results, task_files


def _task_bytes(task: EncodeTask) -> int:
    return sum(i.nbytes for i in task.tensors)


def _account_memory(report: ConversionReport, res: TaskResult) -> None:
    if res.pid != os.getpid():
        report.worker_peak_rss_bytes = max(report.worker_peak_rss_bytes, res.peak_rss)
        report.peak_above_baseline_bytes = max(report.peak_above_baseline_bytes, res.peak_rss_above_start)
        return
    report.peak_rss_bytes = max(report.peak_rss_bytes, res.peak_rss)
    # A task that ran alone (during the plan) measured itself. The others share the process's peak:
    # above the baseline, or above the task's own start where memory was freed after the baseline.
    above = res.peak_rss_above_start
    if not res.own_peak:
        above = max(above, res.peak_rss - report.baseline_rss_bytes)
    report.peak_above_baseline_bytes = max(report.peak_above_baseline_bytes, above)


def _choose_workers(workers: int | None) -> int:
    if workers is None:
        return 1
    if workers < 1:
        raise ConversionError(f"workers must be >= 1, got {workers}")
    return int(workers)


def _ping() -> int:
    return os.getpid()


class _TaskThreads:
    """Encode tasks on threads of this process, one per core, each codec call on its own thread.

    While this process plans (imports transformers' modeling code) one task runs at a time: the
    plan is the critical path of a small model, and more task threads would slow it down (GIL
    hand-offs) more than they add; a task alone also measures its own peak memory. :meth:`quiesce`
    waits for the task in flight, so the memory of the imports can be read apart from the tasks';
    :meth:`use_all_cores` then opens every thread.
    """

    def __init__(self, threads: int):
        self.threads = threads
        self._allowed = 1  # tasks that may run at once now
        self._running = 0
        self._turn = threading.Condition()
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="tpde-task",
                                           initializer=limit_codec_threads, initargs=(1,))

    def _run(self, task: EncodeTask) -> TaskResult:
        with self._turn:
            while self._running >= self._allowed:
                self._turn.wait()
            self._running += 1
            alone = self._allowed == 1  # then no other task can start before this one ends
        try:
            return run_task(task, own_peak=alone)
        finally:
            with self._turn:
                self._running -= 1
                self._turn.notify_all()

    def submit(self, task: EncodeTask) -> Future:
        return self.executor.submit(self._run, task)

    def quiesce(self) -> None:
        """Block until no task runs, and start none until :meth:`use_all_cores`."""
        with self._turn:
            self._allowed = 0
            while self._running:
                self._turn.wait()

    def use_all_cores(self) -> None:
        with self._turn:
            self._allowed = self.threads
            self._turn.notify_all()

    def shutdown(self) -> None:
        self.use_all_cores()  # tasks blocked on a slot must run (or be cancelled) for the pool to stop
        self.executor.shutdown(wait=True, cancel_futures=True)


class _Pool:
    """Worker processes, started eagerly, one task at a time each, the cores shared out among them."""

    def __init__(self, workers: int):
        self.threads = max(1, _cpu_count() // workers)
        # spawn, not fork: forking a process that has used torch's thread pools can deadlock.
        self.executor = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                            initializer=init_worker, initargs=(self.threads,))
        self._warm = [self.executor.submit(_ping) for _ in range(workers)]

    def submit(self, task: EncodeTask) -> Future:
        return self.executor.submit(run_task, task)

    def quiesce(self) -> None:
        """Nothing to wait for: this process runs no task, so its memory is the plan's alone."""

    def use_all_cores(self) -> None:
        """Every worker process runs from the start."""

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)
