"""``convert``: any model (local folder, Hub repo, ``.bin``, GGUF) to a verified tpde repo.

Pipeline (all inside a hidden sibling folder ``.<out>.tpde-partial``, moved into place at the end):

1. resolve the source; re-save ``.bin`` / GGUF weights as safetensors ("staging"), and with ``dtype=`` every
   floating tensor cast to it, so that the repo is exact with respect to the cast model
   (:mod:`~tpde_hf.conversion.cast`);
2. read the safetensors headers only, and decide from the architecture (built on the ``meta``
   device, keys resolved through transformers' own key mapping) which tensors are linear-like
   weights to convert (:mod:`~tpde_hf.conversion.selection`);
3. encode in tasks of about a million weights, on one thread per core (the codec drops the GIL)
   or in worker processes (an expert tensor stored as 3-D is encoded one expert at a time:
   :func:`encode_units`); each task writes its own file, reads it back, decodes it and compares
   bits with the source; a journal records finished tasks so ``resume=True`` continues an
   interrupted run. Weights that are almost surely linear-like start encoding while step 2
   imports transformers' modeling code, so that import costs little wall time;
4. store dense every weight whose encoding is not smaller than its source (a repo never grows);
   stream everything into output shards (one tensor in memory at a time), re-read each shard and
   compare every tensor's bytes with what was verified; write ``config.json`` (with
   ``quantization_config``), ``tpde_manifest.json``, the model card, and the carried files;
5. rename the folder into place (atomic), optionally push it to the Hub.

Example::

    from tpde_hf.conversion import convert
    report = convert("HuggingFaceTB/SmolLM2-135M", "smollm2-tpde", group_size=64)
    print(report.summary_table())
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import torch

from tpde_hf.codec import CodecParams
from tpde_hf.conversion.assembly import (
    _assemble,
    _encoded_parts,
    _keep_smaller_dense,
    _move_into_place,
    _record_selection,
    _resumed_hashes,
    _Run,
    _whole_results,
    _write_metadata,
    dump_manifest,
    stored_cost,
)
from tpde_hf.conversion.encoding import (
    TASK_ELEMENTS,
    _choose_workers,
    _cpu_count,
    _Encoding,
    _Pool,
    _TaskThreads,
    encode_units,
    make_tasks,
)
from tpde_hf.conversion.errors import ConversionError, VerificationError
from tpde_hf.conversion.layout_cache import cached_layout
from tpde_hf.conversion.memory import peak_rss, reset_peak
from tpde_hf.conversion.partial import keeps_partial_only_if_resumable, partial_dir, prepare_partial
from tpde_hf.conversion.report import ConversionReport
from tpde_hf.conversion.selection import (
    ModelLayout,
    config_vocab_sizes,
    likely_linear_weights,
    load_layout,
    select_tensors,
)
from tpde_hf.conversion.sources import Source, check_safetensors, resolve_source, stage_weights
from tpde_hf.conversion.streaming import TensorInfo, read_header
from tpde_hf.conversion.worker import TensorResult
from tpde_hf.errors import TpdeFormatError

# The public names of the conversion's stages stay importable from here. A test that changes how tasks are
# batched patches ``tpde_hf.conversion.encoding.TASK_ELEMENTS``: the name below is only a copy.
__all__ = [
    "TASK_ELEMENTS",
    "convert",
    "dump_manifest",
    "encode_units",
    "make_tasks",
    "parse_size",
    "partial_dir",
    "stored_cost",
]

logger = logging.getLogger("tpde_hf.conversion")

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "float32": torch.float32, "fp32": torch.float32}


def parse_size(size: int | str) -> int:
    """``"5GB"`` -> 5_000_000_000; ``"500MiB"`` -> 524_288_000; ints pass through."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B?\s*", str(size), re.IGNORECASE)
    if not m:
        raise ConversionError(f"cannot parse size {size!r} (examples: 5GB, 500MB, 2GiB)")
    unit = 1024 if m[3] else 1000
    return int(float(m[1]) * unit ** " KMGT".index(m[2].upper() or " "))


@keeps_partial_only_if_resumable
def convert(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    group_size: int = 128,
    delta_code: str = "rans",
    storage: str | None = None,
    base_quantizer: str = "minmax",
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
    reference: str | os.PathLike | None = None,
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
        storage: a registered base storage (:data:`tpde_hf.codec.registry.BASE_STORAGE`) that lays each
            converted weight out on disk (see :mod:`tpde_hf.storage_format`); None: the resident layout.
        keep_dense: checkpoint or model module names (or dotted suffixes) never converted. A tied ``lm_head``
            always stays dense.
        include, exclude: regular expressions searched in the checkpoint name (without ``.weight``) and in the
            model module name, to narrow the conversion (see :mod:`tpde_hf.conversion.selection`).
        workers: worker processes. The default, 1, encodes in this process on one thread per core,
            which measured faster than processes on 2 cores (no process start-up, no imports twice).
        overwrite: replace an existing ``output_dir`` (only once the new repo is complete).
        resume: continue an interrupted conversion of the same source with the same options.
        verify: decode every converted tensor and compare it bit for bit with the source (default on).
        push_to_hub: a repo id to push the finished folder to (see :func:`push_to_hub` for the rest).
        dtype: ``"bfloat16"``, ``"float16"`` or ``"float32"``: cast every floating tensor of the source
            (linear weights and dense tensors alike, as ``from_pretrained(dtype=...)`` would) before encoding,
            one tensor at a time; the repo is then an exact copy of the cast model, which its config
            (``quantization_config.cast_from``), report and card say. A finite value that would become inf
            (float32 beyond float16's range) is refused, naming the tensor. Default: every tensor keeps its
            stored dtype (a GGUF file is dequantized to float32, exactly). See :mod:`tpde_hf.conversion.cast`.
        gguf_file: which GGUF file of a folder or Hub repo to convert.
        max_shard_size: output shard size limit (``"5GB"``).
        base_model: the Hub id written as ``base_model`` in the card (default: the source repo id).
        trust_remote_code: allow custom-code architectures (only built on the meta device, never run).
        base_quantizer: how the encoder picks the 4-bit base (:mod:`tpde_hf.codec.base_quantizers`):
            ``"minmax"`` (default) or ``"search"`` (smaller error, for ``base`` mode and the draft; slower).
        codec_params: full codec parameters (overrides ``group_size``, ``delta_code``, ``storage`` and
            ``base_quantizer``).
        endpoint, cache_dir: Hub endpoint and cache for the source download.
        reference: a fine-tune's base model (Hub id with optional ``@revision``, or a local folder): store every
            tensor it shares with the base as an exact delta against it, where that is smaller
            (:mod:`tpde_hf.reference.convert`); the report's ``reference`` attribute then holds its summary.
        on_tensor: called in this process after each tensor is encoded and verified (progress hook;
            raising from it aborts the run, which ``resume=True`` can continue).

    Returns:
        a :class:`ConversionReport` (also saved as ``tpde_conversion.json`` in the repo).

    Raises:
        ConversionError: bad source, existing output, mismatched resume, unreadable files, a ``dtype`` cast
            that would turn a finite value into inf.
        TpdeFormatError: a source safetensors file is truncated or malformed (the message names it).
        VerificationError: a decoded tensor differs from its source (nothing is moved into place).

    A failure never leaves ``output_dir``. The hidden partial folder beside it is kept only when
    ``resume=True`` can continue from it (an interruption, a full disk...; not bad input): see
    :mod:`tpde_hf.conversion.partial`.

    Example::

        report = convert("./llama-folder", "./llama-tpde", exclude=r"\\.k_proj$", workers=2)
        assert report.verified
    """
    if reference is not None:
        options = {k: v for k, v in locals().items() if k not in ("source", "output_dir", "reference")}
        from tpde_hf.reference.convert import convert_report

        return convert_report(source, output_dir, reference, options)
    t_start = time.perf_counter()
    reset_peak()
    out = Path(output_dir).expanduser().absolute()
    partial = partial_dir(out)
    params = codec_params or CodecParams(group_size=group_size, delta_code=delta_code, storage=storage,
                                         base_quantizer=base_quantizer)
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
    options = {
        "codec": vars(params), "keep_dense": sorted(keep_dense or ()), "include": include, "exclude": exclude,
        "dtype": str(dtype_t) if dtype_t else None, "max_shard_size": parse_size(max_shard_size),
    }
    state = {"source": src.fingerprint(), "options": options}
    # Safetensors headers are checked before anything is written: a damaged source then fails without
    # touching the partial folder of an earlier run. Staged (.bin, GGUF) weights are read once staged.
    early_infos = _read_headers(src.weight_files) if src.weight_format == "safetensors" else None
    prepare_partial(partial, state, resume)
    src = stage_weights(src, partial / "staging", dtype=dtype_t)
    seconds["source"] = time.perf_counter() - t

    t = time.perf_counter()
    # A cast staged new files: their headers, not the source's, are what the conversion reads.
    infos = early_infos if early_infos is not None and src.cast is None else _read_headers(src.weight_files)
    n_workers = _choose_workers(workers)
    runner: _TaskThreads | _Pool = _TaskThreads(_cpu_count()) if n_workers == 1 else _Pool(n_workers)
    plan_peak = peak_rss()  # fetching and staging (GGUF, .bin): reported apart
    baseline = reset_peak()
    encoding = _Encoding(partial, params, verify, runner)
    try:
        encoding.start(likely_linear_weights(infos, keep_dense=keep_dense, include=include, exclude=exclude,
                                             vocab_sizes=config_vocab_sizes(src.folder)))
        layout, layout_cached = _layout_or_none(src, include, trust_remote_code, [i.name for i in infos])
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
            group_size=params.group_size, codec=vars(params), warnings=list(src.warnings), workers=n_workers,
            threads=runner.threads, layout_cached=layout_cached, plan_peak_rss_bytes=plan_peak,
            baseline_rss_bytes=baseline,
            peak_rss_bytes=max(peak_during_plan, baseline),
            cast=asdict(src.cast) if src.cast else None,
        )
        _record_selection(report, selection)
        run = _Run(src, out, partial, params, report, infos, selection, layout)
        seconds["plan"] = time.perf_counter() - t
        # While the encoders run, this thread reads what the model card needs (imports included).
        src.load_card_metadata()
        import tpde_hf.conversion.card  # noqa: F401
        unit_results, task_files = encoding.finish(run, on_tensor)
        seconds["encode_verify"] = encoding.seconds
    finally:
        encoding.progress.close()  # before any error message, so that it does not land on the bar's line
        runner.shutdown()
    by_name = {i.name: i for i in infos}
    units = encode_units(selection, by_name)
    parts = _encoded_parts(units, task_files)
    results = _whole_results(units, unit_results, by_name)
    _keep_smaller_dense(selection, results, parts, by_name)
    _record_selection(report, selection)
    if not selection.encoded:
        raise ConversionError(f"{src.spec}: no weight is smaller when encoded ({len(selection.dense_linears)} "
                              "linear-like weights, all tiny or with rows much shorter than a group); a tpde repo "
                              "would be no smaller than the source")

    t = time.perf_counter()
    stage = partial / "out"
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir()
    resumed = {u.name for n in selection.encoded for u in units[n]} & encoding.resumed_names
    manifest = _assemble(run, results, parts, stage, options["max_shard_size"],
                         _resumed_hashes(resumed, unit_results, task_files))
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


def _read_headers(files: list[Path]) -> list[TensorInfo]:
    infos: list[TensorInfo] = []
    seen: dict[str, Path] = {}
    for f in files:
        header = read_header(f)  # our checks first: they name the tensor a truncation cut
        check_safetensors(f)
        for name, info in header.items():
            if name in seen:
                raise ConversionError(f"{f}: tensor {name!r} is also stored in {seen[name]}")
            seen[name] = f
            infos.append(info)
    return infos


def _layout_or_none(src: Source, include: str | None, trust_remote_code: bool,
                    keys: list[str]) -> tuple[ModelLayout | None, bool]:
    """``(layout, from_cache)``; ``(None, False)`` when only ``include`` can decide (with a warning)."""
    try:
        return cached_layout(src.folder, trust_remote_code=trust_remote_code, build=load_layout, keys=keys)
    except ConversionError as exc:
        if include and "already quantized" not in str(exc):
            msg = f"{exc} -- converting the 2-D weights matched by include={include!r} instead"
            warnings.warn(msg, UserWarning, stacklevel=3)
            return None, False
        raise

