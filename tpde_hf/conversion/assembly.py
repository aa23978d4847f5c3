"""The output of a conversion: the shards, the manifest, the metadata files, and the move into place.

Once every selected weight is encoded and verified, :func:`_keep_smaller_dense` stores dense the
weights whose encoding is not smaller than the source (a repo never grows); :func:`_assemble` streams
every tensor (or its tpde parts) into output shards, one tensor in memory at a time, and re-reads each
shard to compare its bytes with what was verified; :func:`_write_metadata` writes the carried files,
``tpde_manifest.json`` (:func:`dump_manifest`), the report, the model card and ``config.json`` (last);
:func:`_move_into_place` renames the finished folder into place. :class:`_Run` is the state of one
conversion that these stages share.

Example::

    dump_manifest({"format_version": 1, "tensors": {"a.weight": {"dtype": "bfloat16"}}})
    # '{\n "format_version": 1,\n "tensors": {\n  "a.weight": {"dtype": "bfloat16"}\n }\n}\n'
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from tpde_hf.codec import CodecParams
from tpde_hf.conversion.errors import ConversionError, VerificationError
from tpde_hf.conversion.report import ClassSizes, ConversionReport, tensor_class
from tpde_hf.conversion.selection import LARGER, ModelLayout, Selection
from tpde_hf.conversion.sources import Source
from tpde_hf.conversion.streaming import (
    TensorInfo,
    bytes_checksum,
    iter_bytes,
    read_header,
    verify_file_copies,
    verify_file_hashes,
    write_planned_shard,
)
from tpde_hf.conversion.worker import TensorResult
from tpde_hf.format import (
    CONFIG_NAME,
    CONVERSION_REPORT_NAME,
    MANIFEST_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    make_manifest,
    manifest_entry,
    module_prefix,
    quantization_config_dict,
)
from tpde_hf.storage_format import weight_part_keys

logger = logging.getLogger("tpde_hf.conversion")

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


def _assemble(run: _Run, results: dict[str, TensorResult], parts_of: dict[str, list[TensorInfo]],
              stage: Path, max_shard: int, resumed: dict[Path, dict[str, int]]) -> dict[str, dict]:
    """Copy every tensor into output shards; re-read each shard and compare bytes; return the manifest.

    Every size is known up front, so shards are planned first and each is written in one pass. The
    re-read check of a shard (a byte comparison with what was copied) runs on a thread while the next
    shard is written (file reads and comparisons release the GIL), which puts the second core to
    work. Only dense tensors are hashed while copying, for the manifest; the encoded parts were
    verified by decoding their task file, and the task files of a resumed run are first checked against
    the hashes taken when they were verified (``resumed``: :func:`_resumed_hashes`).
    """
    from huggingface_hub.utils import tqdm as hf_tqdm

    report = run.report
    encoded = set(run.selection.encoded)
    manifest: dict[str, dict] = {}
    classes: dict[str, ClassSizes] = {}
    weight_map: dict[str, str] = {}

    _check_resumed_task_files(resumed)

    # 1. Plan: which tensors (or tpde parts) go into which shard, in the source's order.
    plans: list[list[tuple[TensorInfo, list[TensorInfo]]]] = []
    planned_bytes = 0
    for info in run.infos:
        parts = parts_of[info.name] if info.name in encoded else [info]
        size = sum(p.nbytes for p in parts)
        if not plans or (planned_bytes and planned_bytes + size > max_shard):
            plans.append([])
            planned_bytes = 0
        plans[-1].append((info, parts))
        planned_bytes += size

    # 2. Write each shard in one pass, then compare it with what it was copied from.
    shards = [stage / f"shard-{i:05d}.safetensors" for i in range(len(plans))]
    bar = hf_tqdm(total=sum(i.nbytes for i in run.infos), unit="B", unit_scale=True, desc="Writing shards",
                  name="tpde_hf", smoothing=0)  # the average rate: a first tiny tensor gives no odd early figure
    checks = []
    task_files = _TaskFileRelease(plans, run.partial / "tensors")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tpde-reread") as rereader:
        try:
            for shard, plan in zip(shards, plans, strict=True):
                parts = [t for _, tensors in plan for t in tensors]
                hashes = write_planned_shard(shard, parts, hashed={i.name for i, _ in plan if i.name not in encoded})
                checks.append((shard, rereader.submit(verify_file_copies, shard, {t.name: t for t in parts})))
                task_files.release_checked(checks)
                for info, tensors in plan:
                    res = results[info.name] if info.name in encoded else None
                    _record_tensor(info, tensors, hashes, res, shard.name, manifest, classes, weight_map)
                    if info.nbytes > report.largest_tensor_bytes:
                        report.largest_tensor_bytes, report.largest_tensor = info.nbytes, info.name
                    bar.update(info.nbytes)
            task_files.release_checked(checks, wait=True)
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


class _TaskFileRelease:
    """Deletes each encode task file once every shard that copies from it has been written and re-read.

    Without this a conversion holds its output twice at the end (the task files and the shards): a
    22.7 GB checkpoint ran out of disk that way. A task file is only a verified copy of what the shards
    now hold; a conversion interrupted after a release re-encodes that task on ``resume=True`` (the
    journal's entry no longer finds its file), so nothing is lost but time.

    Example: ``_TaskFileRelease(plans, partial / "tensors").release_checked(checks, wait=True)``.
    """

    def __init__(self, plans: list[list[tuple[TensorInfo, list[TensorInfo]]]], tasks_dir: Path):
        tasks_dir = tasks_dir.resolve()
        self.shard_files: list[set[Path]] = [
            {t.file for _, tensors in plan for t in tensors if t.file.resolve().parent == tasks_dir} for plan in plans]
        self.readers: dict[Path, int] = {}
        for files in self.shard_files:
            for f in files:
                self.readers[f] = self.readers.get(f, 0) + 1
        self.checked = 0

    def release_checked(self, checks: list, wait: bool = False) -> None:
        """Raise on a shard whose re-read differs; release the task files of the shards checked so far, in
        order (``wait``: every submitted check, else only those already done)."""
        while self.checked < len(checks):
            shard, check = checks[self.checked]
            if not wait and not check.done():
                return
            bad = check.result()
            if bad:
                raise VerificationError(f"{shard}: tensors differ after writing: {bad[:5]}", bad)
            for f in self.shard_files[self.checked]:
                self.readers[f] -= 1
                if self.readers[f] == 0:
                    f.unlink(missing_ok=True)
            self.checked += 1


def _encoded_parts(units: dict[str, list[TensorInfo]], task_files: dict[str, Path]) -> dict[str, list[TensorInfo]]:
    """The stored parts (``X.qweight`` ... ``X.meta``, or ``X.tpde_storage.S.*``) of each encoded weight (of
    each of its expert slices, in expert order), from the task files' headers."""
    headers: dict[Path, dict[str, TensorInfo]] = {}
    out: dict[str, list[TensorInfo]] = {}
    for name, encoded in units.items():
        out[name] = []
        for unit in encoded:
            tf = task_files[unit.name]
            if tf not in headers:
                headers[tf] = read_header(tf)
            prefix = module_prefix(unit.name)
            out[name] += [headers[tf][k] for k in weight_part_keys(headers[tf], prefix)]  # resident or storage
    return out


def _whole_results(units: dict[str, list[TensorInfo]], unit_results: dict[str, TensorResult],
                   infos: dict[str, TensorInfo]) -> dict[str, TensorResult]:
    """One result per selected weight: a 3-D expert tensor's sums its slices' sizes, is verified when every
    slice is, and carries the 3-D shape and the checksum of the whole source tensor (the manifest's entry)."""
    out: dict[str, TensorResult] = {}
    for name, encoded in units.items():
        if len(encoded) == 1 and encoded[0].name == name:
            out[name] = unit_results[name]
            continue
        rs = [unit_results[u.name] for u in encoded]
        info = infos[name]
        out[name] = TensorResult(
            name=name, dtype=rs[0].dtype, shape=list(info.shape), checksum=bytes_checksum(iter_bytes(info)),
            source_bytes=sum(r.source_bytes for r in rs), base_bytes=sum(r.base_bytes for r in rs),
            delta_bytes=sum(r.delta_bytes for r in rs), meta_bytes=sum(r.meta_bytes for r in rs),
            part_hashes={k: h for r in rs for k, h in r.part_hashes.items()}, verified=all(r.verified for r in rs),
        )
    return out


def stored_cost(name: str, nbytes: int) -> int:
    """Bytes one stored tensor costs in a repo: its data, plus an upper bound of its safetensors header
    entry (name, dtype, shape, offsets) and of a per-tensor checksum in the header metadata.

    The same bound for both sides errs against the tpde parts (7 entries against 1), so a weight whose
    encoding is kept makes the repo smaller, headers included.
    """
    return nbytes + 2 * len(name) + 128


def _keep_smaller_dense(selection: Selection, results: dict[str, TensorResult],
                        parts: dict[str, list[TensorInfo]], infos: dict[str, TensorInfo]) -> list[str]:
    """Store dense every encoded weight whose parts would take at least as many bytes as the weight itself
    (tiny matrices, rows much shorter than a group), with the other inputs of its fused parameter: a repo
    never grows. Returns the names moved (their verified encodings are simply not used)."""
    larger = {}
    for name in selection.encoded:
        enc = sum(stored_cost(p.name, p.nbytes) for p in parts[name])
        dense = stored_cost(name, infos[name].nbytes)
        if enc >= dense:
            larger[name] = LARGER
    moved = selection.keep_dense(larger)
    for name in moved:
        parts.pop(name, None)
        results.pop(name, None)
    if moved:
        logger.info("%d weight(s) stored dense, not smaller when encoded: %s", len(moved),
                    ", ".join(moved[:5]) + (", ..." if len(moved) > 5 else ""))
    return moved


def _record_selection(report: ConversionReport, selection: Selection) -> None:
    """The selection's current state in the report: what stays dense, and why."""
    report.modules_to_not_convert = list(selection.modules_to_not_convert)
    report.dense_linears = list(selection.dense_linears)
    report.dense_linear_reasons = selection.dense_linear_reasons()
    report.dense_reasons = selection.reasons()
    report.source_dtype = selection.source_dtype


def _resumed_hashes(resumed: set[str], unit_results: dict[str, TensorResult], task_files: dict[str, Path]
                    ) -> dict[Path, dict[str, int]]:
    """``{task file: {stored key: hash}}`` of the encoded units (``resumed``) an earlier run verified."""
    expected: dict[Path, dict[str, int]] = {}
    for name in resumed:
        expected.setdefault(task_files[name], {}).update(unit_results[name].part_hashes)
    return expected


def _check_resumed_task_files(expected: dict[Path, dict[str, int]]) -> None:
    """The task files an earlier run verified must still hold the bytes it verified (hashes in the journal)."""
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
    cast = run.src.cast
    config["quantization_config"] = quantization_config_dict(run.params, dtype, run.selection.modules_to_not_convert,
                                                             cast.config_value if cast else None)
    if cast is not None:
        # The dtype the model now has, under the key(s) the source's config used ("dtype" in transformers 5).
        for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
            config[key] = cast.dtype
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
