"""``convert``: any model (local folder, Hub repo, ``.bin``, GGUF) to a verified tpde repo.

Pipeline (all inside a hidden sibling folder ``.<out>.tpde-partial``, moved into place at the end):

1. resolve the source; re-save ``.bin`` / GGUF weights as safetensors ("staging");
2. read the safetensors headers only, and decide from the architecture (built on the ``meta``
   device) which tensors are ``nn.Linear`` weights to convert;
3. encode in tasks of about a million weights, on one thread per core (the codec drops the GIL)
   or in worker processes; each task writes its own file, reads it back, decodes it and compares
   bits with the source; a journal records finished tasks so ``resume=True`` continues an
   interrupted run. Weights that are almost surely ``nn.Linear`` start encoding while step 2
   imports transformers' modeling code, so that import costs little wall time;
4. stream everything into output shards (one tensor in memory at a time), re-read each shard and
   compare every tensor's bytes with what was verified; write ``config.json`` (with
   ``quantization_config``), ``tpde_manifest.json``, the model card, and the carried files;
5. rename the folder into place (atomic), optionally push it to the Hub.

Example::

    from tpde_hf.conversion import convert
    report = convert("HuggingFaceTB/SmolLM2-135M", "smollm2-tpde", group_size=64)
    print(report.summary_table())
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import torch

from tpde_hf.codec import CodecParams, limit_codec_threads
from tpde_hf.conversion.errors import ConversionError, VerificationError
from tpde_hf.conversion.layout_cache import cached_layout
from tpde_hf.conversion.memory import peak_rss, reset_peak
from tpde_hf.conversion.report import ClassSizes, ConversionReport, tensor_class
from tpde_hf.conversion.selection import (
    ModelLayout,
    Selection,
    config_vocab_sizes,
    likely_linear_weights,
    load_layout,
    select_tensors,
)
from tpde_hf.conversion.sources import Source, resolve_source, stage_weights
from tpde_hf.conversion.streaming import (
    TensorInfo,
    read_header,
    verify_file_copies,
    verify_file_hashes,
    write_planned_shard,
)
from tpde_hf.conversion.worker import EncodeTask, TaskResult, TensorResult, init_worker, run_task
from tpde_hf.errors import TpdeFormatError
from tpde_hf.format import (
    CONFIG_NAME,
    CONVERSION_REPORT_NAME,
    MANIFEST_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    SUFFIXES,
    make_manifest,
    manifest_entry,
    module_prefix,
    quantization_config_dict,
)

logger = logging.getLogger("tpde_hf.conversion")

TASK_ELEMENTS = 1 << 20  # weights per encode task: small tensors are batched up to this (a tensor is never split)
STATE_NAME = "state.json"
JOURNAL_NAME = "journal.jsonl"
_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


def partial_dir(output_dir: str | os.PathLike) -> Path:
    """Where an unfinished conversion of ``output_dir`` lives: a hidden sibling folder."""
    out = Path(output_dir).absolute()
    return out.parent / f".{out.name}.tpde-partial"


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000; ``"500MiB"`` -> 524_288_000; ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ConversionError(f"cannot parse size {size!r} (examples: 5GB, 500MB, 2GiB)")
    unit = 1024 if m[3] else 1000
    return int(float(m[1]) * unit ** " KMGT".index(m[2].upper() or " "))


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


@dataclass
class _Run:
    """Mutable state of one conversion, passed between the stages."""

    src: Source
    out: Path
    partial: Path
    params: CodecParams
    report: ConversionReport
    infos: list[TensorInfo]
    selection: Selection
    layout: ModelLayout | None


def convert(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    group_size: int = 128,
    delta_code: str = "rans",
    keep_dense: Iterable[str] = ("lm_head",),
    include: str | None = None,
    exclude: str | None = None,
    workers: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    verify: bool = True,
    push_to_hub: str | None = None,
    private: bool = False,
    push_revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    dtype: str | torch.dtype | None = None,
    gguf_file: str | None = None,
    max_shard_size: int | str = "5GB",
    base_model: str | None = None,
    trust_remote_code: bool = False,
    codec_params: CodecParams | None = None,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    on_tensor: Callable[[TensorResult], None] | None = None,
) -> ConversionReport:
    """Convert ``source`` into a verified tpde repo at ``output_dir``; optionally push it.

    Args:
        source: a local HF model folder (safetensors, sharded or not, or ``.bin``), a ``.gguf`` file,
            or a Hub repo id (downloaded through the huggingface_hub cache).
        output_dir: the repo folder to create. Refused if it exists, unless ``overwrite``.
        revision, token: Hub revision and token of the source (token: default lookup when None).
        group_size: 4-bit group size (32, 64 or 128).
        delta_code: the delta's code, ``"rans"`` (smallest) or ``"class-width"`` (a little larger,
            decoded without a dependent chain; see :mod:`tpde_hf.codec.tensor_codec`).
        keep_dense: module names (or dotted suffixes) never converted. A tied ``lm_head`` always stays dense.
        include, exclude: regular expressions on module names, to narrow the conversion.
        workers: worker processes. The default, 1, encodes in this process on one thread per core,
            which measured faster than processes on 2 cores (no process start-up, no imports twice).
        overwrite: replace an existing ``output_dir`` (only once the new repo is complete).
        resume: continue an interrupted conversion of the same source with the same options.
        verify: decode every converted tensor and compare it bit for bit with the source (default on).
        push_to_hub: a repo id to push the finished folder to (see :func:`push_to_hub` for the rest).
        dtype: for GGUF sources only, the dtype to dequantize to (default float32, exact). Other
            sources keep each tensor's stored dtype: this is a lossless format.
        gguf_file: which GGUF file of a folder or Hub repo to convert.
        max_shard_size: output shard size limit (``"5GB"``).
        base_model: the Hub id written as ``base_model`` in the card (default: the source repo id).
        trust_remote_code: allow custom-code architectures (only built on the meta device, never run).
        codec_params: full codec parameters (overrides ``group_size`` and ``delta_code``).
        endpoint, cache_dir: Hub endpoint and cache for the source download.
        on_tensor: called in this process after each tensor is encoded and verified (progress hook;
            raising from it aborts the run, which ``resume=True`` can continue).

    Returns:
        a :class:`ConversionReport` (also saved as ``tpde_conversion.json`` in the repo).

    Raises:
        ConversionError: bad source, existing output, mismatched resume, unreadable files.
        VerificationError: a decoded tensor differs from its source (nothing is moved into place).

    Example::

        report = convert("./llama-folder", "./llama-tpde", exclude=r"\\.k_proj$", workers=2)
        assert report.verified
    """
    t_start = time.perf_counter()
    reset_peak()
    out = Path(output_dir).expanduser().absolute()
    partial = partial_dir(out)
    params = codec_params or CodecParams(group_size=group_size, delta_code=delta_code)
    try:
        params.validate()
    except TpdeFormatError as exc:
        raise ConversionError(f"invalid codec parameters: {exc}") from None
    dtype_t = _parse_dtype(dtype)
    _check_output(out, overwrite)
    seconds: dict[str, float] = {}

    t = time.perf_counter()
    src = resolve_source(source, revision=revision, token=token, gguf_file=gguf_file, endpoint=endpoint,
                         cache_dir=cache_dir)
    _check_not_inside(src, out)
    if dtype_t is not None and src.weight_format != "gguf":
        raise ConversionError(
            f"{src.spec}: dtype= only applies to GGUF sources; a {src.weight_format} source keeps its stored dtypes "
            "(tpde is lossless: the original is what you convert)"
        )
    options = {
        "codec": vars(params), "keep_dense": sorted(keep_dense or ()), "include": include, "exclude": exclude,
        "dtype": str(dtype_t) if dtype_t else None, "max_shard_size": parse_size(max_shard_size),
    }
    state = {"source": src.fingerprint(), "options": options}
    _prepare_partial(partial, state, resume)
    src = stage_weights(src, partial / "staging", dtype=dtype_t)
    seconds["source"] = time.perf_counter() - t

    t = time.perf_counter()
    infos = _read_headers(src.weight_files)
    n_workers = _choose_workers(workers)
    runner: _TaskThreads | _Pool = _TaskThreads(_cpu_count()) if n_workers == 1 else _Pool(n_workers)
    plan_peak = peak_rss()  # fetching and staging (GGUF, .bin): reported apart
    baseline = reset_peak()
    encoding = _Encoding(partial, params, verify, runner)
    try:
        encoding.start(likely_linear_weights(infos, keep_dense=keep_dense, include=include, exclude=exclude,
                                             vocab_sizes=config_vocab_sizes(src.folder)))
        layout, layout_cached = _layout_or_none(src, include, trust_remote_code)
        selection = select_tensors(infos, layout, keep_dense=keep_dense, include=include, exclude=exclude)
        peak_during_plan = peak_rss()
        if not layout_cached:
            # Building the layout imported transformers' modeling code, which stays loaded and is no
            # part of the streaming: the baseline moves up to after the imports, read with no task
            # in flight. The tasks that ran during the plan ran alone and measured their own peaks.
            runner.quiesce()
            peak_during_plan = peak_rss()
            baseline = reset_peak()
        if not selection.encoded:
            reasons = ", ".join(f"{n} {r}" for r, n in selection.reasons().items())
            raise ConversionError(f"{src.spec}: no tensor selected for conversion ({reasons})")
        report = ConversionReport(
            source=src.spec, output=str(out), source_kind=src.kind, repo_id=src.repo_id, commit=src.commit,
            architecture=layout.architecture if layout else None, source_dtype=selection.source_dtype,
            group_size=params.group_size, codec=vars(params), modules_to_not_convert=selection.modules_to_not_convert,
            dense_linears=selection.dense_linears,
            dense_reasons=selection.reasons(), warnings=list(src.warnings), workers=n_workers,
            threads=runner.threads, layout_cached=layout_cached, plan_peak_rss_bytes=plan_peak,
            baseline_rss_bytes=baseline,
            peak_rss_bytes=max(peak_during_plan, baseline),
        )
        run = _Run(src, out, partial, params, report, infos, selection, layout)
        seconds["plan"] = time.perf_counter() - t
        # While the encoders run, this thread reads what the model card needs (imports included).
        src.load_card_metadata()
        import tpde_hf.conversion.card  # noqa: F401
        results, task_files = encoding.finish(run, on_tensor)
        seconds["encode_verify"] = encoding.seconds
    finally:
        runner.shutdown()

    t = time.perf_counter()
    stage = partial / "out"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    manifest = _assemble(run, results, task_files, stage, options["max_shard_size"], encoding.resumed_names)
    seconds["assemble"] = time.perf_counter() - t
    report.verified = verify
    report.verified_tensors = sum(r.verified for r in results.values())
    if verify and report.verified_tensors != len(selection.encoded):
        raise VerificationError(f"{out}: only {report.verified_tensors}/{len(selection.encoded)} tensors verified")

    report.peak_rss_bytes = max(report.peak_rss_bytes, peak_rss())
    report.peak_above_baseline_bytes = max(report.peak_above_baseline_bytes, report.peak_rss_bytes - baseline)
    report.total_peak_rss_bytes = report.peak_rss_bytes + report.workers * report.worker_peak_rss_bytes * (
        report.workers > 1)
    t = time.perf_counter()
    seconds["total"] = time.perf_counter() - t_start  # provisional: the card shows the report
    report.seconds = seconds
    _write_metadata(run, stage, manifest, base_model, push_to_hub)
    _move_into_place(stage, out, partial)
    seconds["finalize"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t_start
    logger.info("converted %s -> %s", src.spec, out)

    if push_to_hub:
        from tpde_hf.conversion.hub import push_to_hub as _push

        try:
            _push(out, push_to_hub, token=token, private=private, revision=push_revision, create_pr=create_pr,
                  commit_message=commit_message, endpoint=endpoint)
        except ConversionError as exc:
            raise type(exc)(f"{out} is converted and verified, but the push failed: {exc} -- retry with "
                            f"`tpde push {out} {push_to_hub}`") from exc
        report.pushed_to = push_to_hub
    return report


# ==================================================================== preparation
def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype == "auto":
        return None
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ConversionError(f"dtype {dtype} not supported (bfloat16, float16 or float32)")
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ConversionError(f"dtype {dtype!r} not supported (bfloat16, float16 or float32)") from None


def _check_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConversionError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConversionError(f"{out} already exists and is not empty; pass overwrite=True (--overwrite) to replace it "
                              "(the old folder is kept until the new repo is complete)")


def _check_not_inside(src: Source, out: Path) -> None:
    folder = src.folder.resolve()
    target = out.resolve()
    if target == folder or folder.is_relative_to(target):
        raise ConversionError(f"{out}: the output folder would replace the source folder {folder}")


def _prepare_partial(partial: Path, state: dict, resume: bool) -> None:
    state_file = partial / STATE_NAME
    if partial.exists():
        old = None
        try:
            old = json.loads(state_file.read_text())
        except (OSError, ValueError):
            pass
        if resume:
            if old is None:
                raise ConversionError(f"{partial}: unfinished conversion without a readable {STATE_NAME}; "
                                      "delete this folder to start over")
            diff = [k for k in ("source", "options") if old.get(k) != state[k]]
            if diff:
                detail = {k: {"before": old.get(k), "now": state[k]} for k in diff}
                raise ConversionError(
                    f"{partial}: cannot resume, the {' and '.join(diff)} changed since the interrupted run: "
                    f"{json.dumps(detail)}. Rerun with the same source and options, or without resume to start over."
                )
            logger.info("resuming the conversion in %s", partial)
            return
        logger.warning("discarding an unfinished conversion in %s (pass resume=True / --resume to continue it)",
                       partial)
        shutil.rmtree(partial)
    elif resume:
        logger.info("nothing to resume in %s; starting a new conversion", partial)
    partial.mkdir(parents=True)
    state_file.write_text(json.dumps(state, indent=1))


def _read_headers(files: list[Path]) -> list[TensorInfo]:
    infos: list[TensorInfo] = []
    seen: dict[str, Path] = {}
    for f in files:
        for name, info in read_header(f).items():
            if name in seen:
                raise ConversionError(f"{f}: tensor {name!r} is also stored in {seen[name]}")
            seen[name] = f
            infos.append(info)
    return infos


def _layout_or_none(src: Source, include: str | None, trust_remote_code: bool) -> tuple[ModelLayout | None, bool]:
    """``(layout, from_cache)``; ``(None, False)`` when only ``include`` can decide (with a warning)."""
    try:
        return cached_layout(src.folder, trust_remote_code=trust_remote_code, build=load_layout)
    except ConversionError as exc:
        if include and "already quantized" not in str(exc):
            msg = f"{exc} -- converting the 2-D weights matched by include={include!r} instead"
            warnings.warn(msg, UserWarning, stacklevel=3)
            return None, False
        raise


# ==================================================================== encode + verify
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

    def start(self, infos: list[TensorInfo]) -> None:
        """Make tasks of ``infos`` and hand them out, largest first (those an earlier run finished are reused)."""
        tasks = make_tasks(infos, self.params, self.folder, self.verify, first_index=len(self.tasks))
        self.tasks += tasks
        pending = []
        for task in tasks:
            if _reusable(self.earlier.get(task.index), task, self.verify):
                self.reused.append(self.earlier[task.index])
            else:
                pending.append(task)
        if pending and self._t0 is None:
            self._t0 = time.perf_counter()
        for task in sorted(pending, key=lambda t: -sum(i.nbytes for i in t.tensors)):
            self.running[self.runner.submit(task)] = task

    def finish(self, run: _Run, on_tensor: Callable[[TensorResult], None] | None
               ) -> tuple[dict[str, TensorResult], dict[str, Path]]:
        """Drop guessed tasks the selection rejects, start the selected weights not guessed, wait for all."""
        from huggingface_hub.utils import tqdm as hf_tqdm

        self.runner.use_all_cores()
        selected = set(run.selection.encoded)
        for fut, task in list(self.running.items()):
            if not any(i.name in selected for i in task.tensors) and fut.cancel():
                del self.running[fut]
        guessed = {i.name for t in self.tasks for i in t.tensors}
        by_name = {i.name: i for i in run.infos}
        self.start([by_name[n] for n in run.selection.encoded if n not in guessed])

        results: dict[str, TensorResult] = {}
        task_files: dict[str, Path] = {}
        for res in self.reused:
            for tr in res.tensors:
                if tr.name in selected:
                    results[tr.name], task_files[tr.name] = tr, Path(res.out)
        self.resumed_names = set(results)
        run.report.resumed_tensors = len(results)
        bar = hf_tqdm(total=sum(by_name[n].nbytes for n in selected), initial=sum(r.source_bytes for r in
                      results.values()), unit="B", unit_scale=True, desc="Encoding + verifying", name="tpde_hf")

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
                bar.update(tr.source_bytes)
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
            bar.close()
        if self._t0 is not None:
            self.seconds = time.perf_counter() - self._t0
        return results, task_files


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


# ==================================================================== assemble
def _assemble(run: _Run, results: dict[str, TensorResult], task_files: dict[str, Path], stage: Path,
              max_shard: int, resumed: set[str]) -> dict[str, dict]:
    """Copy every tensor into output shards; re-read each shard and compare bytes; return the manifest.

    Every size is known up front, so shards are planned first and each is written in one pass. The
    re-read check of a shard (a byte comparison with what was copied) runs on a thread while the next
    shard is written (file reads and comparisons release the GIL), which puts the second core to
    work. Only dense tensors are hashed while copying, for the manifest; the encoded parts were
    verified by decoding their task file, and the task files of a resumed run (``resumed``: their
    weights) are first checked against the hashes taken when they were verified.
    """
    from huggingface_hub.utils import tqdm as hf_tqdm

    report = run.report
    encoded = set(run.selection.encoded)
    headers: dict[Path, dict[str, TensorInfo]] = {}
    manifest: dict[str, dict] = {}
    classes: dict[str, ClassSizes] = {}
    weight_map: dict[str, str] = {}

    _check_resumed_task_files(resumed, results, task_files)

    # 1. Plan: which tensors (or tpde parts) go into which shard, in the source's order.
    plans: list[list[tuple[TensorInfo, list[TensorInfo]]]] = []
    planned_bytes = 0
    for info in run.infos:
        if info.name in encoded:
            tf = task_files[info.name]
            if tf not in headers:
                headers[tf] = read_header(tf)
            prefix = module_prefix(info.name)
            parts = [headers[tf][f"{prefix}.{s}"] for s in SUFFIXES]
        else:
            parts = [info]
        size = sum(p.nbytes for p in parts)
        if not plans or (planned_bytes and planned_bytes + size > max_shard):
            plans.append([])
            planned_bytes = 0
        plans[-1].append((info, parts))
        planned_bytes += size

    # 2. Write each shard in one pass, then compare it with what it was copied from.
    shards = [stage / f"shard-{i:05d}.safetensors" for i in range(len(plans))]
    bar = hf_tqdm(total=sum(i.nbytes for i in run.infos), unit="B", unit_scale=True, desc="Writing shards",
                  name="tpde_hf")
    checks = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tpde-reread") as rereader:
        try:
            for shard, plan in zip(shards, plans, strict=True):
                parts = [t for _, tensors in plan for t in tensors]
                hashes = write_planned_shard(shard, parts, hashed={i.name for i, _ in plan if i.name not in encoded})
                checks.append((shard, rereader.submit(verify_file_copies, shard, {t.name: t for t in parts})))
                for info, tensors in plan:
                    res = results[info.name] if info.name in encoded else None
                    _record_tensor(info, tensors, hashes, res, shard.name, manifest, classes, weight_map)
                    if info.nbytes > report.largest_tensor_bytes:
                        report.largest_tensor_bytes, report.largest_tensor = info.nbytes, info.name
                    bar.update(info.nbytes)
            for shard, check in checks:
                bad = check.result()
                if bad:
                    raise VerificationError(f"{shard}: tensors differ after writing: {bad[:5]}", bad)
        finally:
            bar.close()

    # Final names are known only now (model-0000i-of-0000n).
    n = len(shards)
    names = {s.name: (SAFE_WEIGHTS_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors")
             for i, s in enumerate(shards)}
    for s in shards:
        os.replace(s, stage / names[s.name])
    total = sum((stage / names[s.name]).stat().st_size for s in shards)
    if n > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: names[v] for k, v in sorted(weight_map.items())}}
        (stage / SAFE_WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    report.classes = classes
    report.n_tensors = len(run.infos)
    report.n_encoded = len(encoded)
    report.n_dense = report.n_tensors - report.n_encoded
    report.source_bytes = sum(i.nbytes for i in run.infos)
    report.output_bytes = sum(c.output_bytes for c in classes.values())
    report.n_shards = n
    return manifest


def _check_resumed_task_files(resumed: set[str], results: dict[str, TensorResult], task_files: dict[str, Path]
                              ) -> None:
    """The task files an earlier run verified must still hold the bytes it verified (hashes in the journal)."""
    expected: dict[Path, dict[str, int]] = {}
    for name in resumed:
        expected.setdefault(task_files[name], {}).update(results[name].part_hashes)
    for path, hashes in expected.items():
        changed = verify_file_hashes(path, hashes)
        if changed:
            raise VerificationError(f"{path}: {changed} changed since verified; rerun without resume", changed)


def _record_tensor(info: TensorInfo, tensors: list[TensorInfo], hashes: dict[str, int],
                   res: TensorResult | None, shard_name: str, manifest: dict[str, dict],
                   classes: dict[str, ClassSizes], weight_map: dict[str, str]) -> None:
    """Manifest entry, size class and weight-map lines of one written tensor (``res`` when it was encoded)."""
    for t in tensors:
        weight_map[t.name] = shard_name
    if res is None:
        manifest[info.name] = manifest_entry(info.torch_dtype_name, info.shape, hashes[info.name], False)
        classes.setdefault(tensor_class(info.name, False, len(info.shape)), ClassSizes()).add(
            info.numel, info.nbytes, info.nbytes)
        return
    manifest[info.name] = manifest_entry(res.dtype, res.shape, res.checksum, True)
    classes.setdefault(tensor_class(info.name, True, 2), ClassSizes()).add(
        info.numel, info.nbytes, sum(t.nbytes for t in tensors), res.base_bytes, res.delta_bytes, res.meta_bytes)


def _write_metadata(run: _Run, stage: Path, manifest: dict[str, dict], base_model: str | None,
                    repo_id: str | None) -> None:
    """Carried files, config.json with quantization_config, manifest, report and card (config last)."""
    from tpde_hf.conversion.card import render_card

    for rel in run.src.carried_files():
        dst = stage / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run.src.folder / rel, dst)
    (stage / MANIFEST_NAME).write_text(dump_manifest(make_manifest(manifest)))
    card = render_card(run.report, repo_id=repo_id, source_meta=run.src.load_card_metadata(), base_model=base_model)
    card.save(stage / "README.md")
    cfg_path = run.src.folder / CONFIG_NAME
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConversionError(f"{cfg_path}: unreadable ({exc})") from None
    dtype = getattr(torch, run.selection.source_dtype or "bfloat16")
    config["quantization_config"] = quantization_config_dict(run.params, dtype, run.selection.modules_to_not_convert)
    run.report.output_file_bytes = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
    (stage / CONVERSION_REPORT_NAME).write_text(run.report.to_json() + "\n")
    # config.json last: a folder without it cannot be mistaken for a loadable model.
    (stage / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def dump_manifest(manifest: dict) -> str:
    """JSON with one line per tensor: readable, and diffs well between conversions."""
    lines = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest["tensors"].items()]
    body = ",\n".join(lines)
    return f'{{\n "format_version": {manifest["format_version"]},\n "tensors": {{\n{body}\n }}\n}}\n'


def _move_into_place(stage: Path, out: Path, partial: Path) -> None:
    """Atomic rename of the finished folder; an existing output is replaced only now."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():
        if any(out.iterdir()):
            os.replace(out, partial / "replaced")
        else:
            out.rmdir()
    os.replace(stage, out)
    shutil.rmtree(partial, ignore_errors=True)
