"""The unit of parallel work: encode a batch of weights, write them, decode them back, compare bits.

A task laid out by a base storage (``--storage``) computes only what it writes: the base, the checksum and
the meta, then the storage's parts (:func:`encode_written`); the resident delta is not encoded unless the
meta records it (class-width) or the storage declares that it reads it (``resident``).

A task names its tensors by file and byte range, not by value, so nothing large crosses a process
boundary: each worker reads its own inputs, writes its own ``tensors/<task>.safetensors`` and
returns a small result (sizes, checksums, timings). Runs the same on the main process's task
threads (the codec drops the GIL, so they share the cores) or in a ``spawn`` pool of processes.

Example::

    result = run_task(EncodeTask(0, [TensorRef(...)], params, Path("tensors/0.safetensors")))
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tpde_hf.codec import CodecParams, EncodedTensor, decode_tensors, encode_tensors
from tpde_hf.codec.registry import STORAGE_TOKEN
from tpde_hf.codec.tensor_codec import encode_base_and_meta, meta_needs_delta
from tpde_hf.conversion.memory import peak_rss, reset_peak
from tpde_hf.conversion.streaming import TensorInfo, load_tensor, read_header, write_tensor_file
from tpde_hf.errors import TpdeFormatError
from tpde_hf.format import SUFFIXES, as_encoded, module_prefix
from tpde_hf.storage_format import (
    check_written,
    reads_resident_delta,
    storage_parts,
    stored_parts,
    stored_sizes,
    weight_part_keys,
)


@dataclass(frozen=True)
class EncodeTask:
    """Encode ``tensors`` (weights in source files) into one file ``out``."""

    index: int
    tensors: list[TensorInfo]
    params: CodecParams
    out: Path
    verify: bool = True


@dataclass
class TensorResult:
    """What the main process needs to know about one encoded weight (all small)."""

    name: str  # original weight name, e.g. "model.layers.0.mlp.up_proj.weight"
    dtype: str  # torch spelling, e.g. "bfloat16"
    shape: list[int]
    checksum: int  # tensor_checksum of the original
    source_bytes: int
    base_bytes: int
    delta_bytes: int
    meta_bytes: int
    part_hashes: dict[str, int]  # stored key -> checksum of its bytes as written
    verified: bool

    @property
    def output_bytes(self) -> int:
        return self.base_bytes + self.delta_bytes + self.meta_bytes

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TensorResult:
        return cls(**d)


@dataclass
class TaskResult:
    index: int
    out: str
    tensors: list[TensorResult]
    seconds: float
    peak_rss_above_start: int  # bytes this task added to the worker's resident memory at its peak
    peak_rss: int
    pid: int
    own_peak: bool = False  # peak_rss_above_start is this task's alone (it reset the counter)


#: True in a worker process (set by :func:`init_worker`): tasks there own the process's peak-memory counter.
_worker_process = False


def init_worker(threads: int) -> None:
    """Pool initializer: torch and codec threads per worker process, so that workers x threads = cores."""
    global _worker_process
    _worker_process = True
    torch.set_num_threads(max(1, threads))
    os.environ["TPDE_CODEC_THREADS"] = str(max(1, threads))
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


@dataclass
class WrittenWeight:
    """What a task writes for one weight (``parts``: stored key -> tensor), its resident base and checksum."""

    parts: dict[str, torch.Tensor]
    base: dict[str, torch.Tensor]
    checksum: int


def skips_resident_delta(params: CodecParams) -> bool:
    """Whether a task writes without the resident delta encode: a base storage lays the weights out and declares
    that it codes its own delta (``reads_resident_delta = False``), and the meta records nothing of the
    resident delta (:func:`meta_needs_delta`)."""
    return params.storage is not None and not meta_needs_delta(params) and not reads_resident_delta(params.storage)


def encode_written(weights: dict[str, torch.Tensor], params: CodecParams,
                   skip_delta: bool | None = None) -> dict[str, WrittenWeight]:
    """The stored parts, base and checksum of each weight, as :func:`stored_parts` of the full encode gives them.

    ``skip_delta`` (default :func:`skips_resident_delta`) computes only what the storage layout writes: the
    base, the checksum and the meta (:func:`encode_base_and_meta`), then the storage's parts; the resident
    resident delta is not encoded. ``False``: the full encode of every weight first (what a resident-layout task
    needs, or a storage that reads the writer's encode). Both write the same bytes.

    Example: ``encode_written({"up.weight": w}, CodecParams(storage="narrow-rans"))["up.weight"].parts``.
    """
    skip_delta = skips_resident_delta(params) if skip_delta is None else skip_delta
    out = {}
    if not skip_delta:
        for name, enc in encode_tensors(weights, params).items():
            out[name] = WrittenWeight(stored_parts(enc, weights[name], module_prefix(name)),
                                      {"qweight": enc.qweight, "scales": enc.scales, "zeros": enc.zeros},
                                      enc.checksum)
        return out
    assert params.storage is not None
    for name, w in weights.items():
        base_t, meta, checksum = encode_base_and_meta(w, params, name)
        base = {"qweight": base_t.qweight, "scales": base_t.scales, "zeros": base_t.zeros}
        parts = storage_parts(name, params.storage, w, base, meta, module_prefix(name), encoded=None)
        out[name] = WrittenWeight(parts, base, checksum)
    return out


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)
    )


def run_task(task: EncodeTask, own_peak: bool | None = None) -> TaskResult:
    """Encode, write, re-read, decode and compare every weight of ``task``.

    ``own_peak``: no other task runs in this process meanwhile, so this one may reset the process's
    peak-memory counter and report its own peak (default: in a worker process). Otherwise the
    caller reads the process's peak across all its tasks.

    Raises :class:`TpdeFormatError` naming the tensor if a decoded weight differs from its source.
    """
    own_peak = _worker_process if own_peak is None else own_peak
    start_rss = reset_peak() if own_peak else peak_rss()
    t0 = time.perf_counter()
    weights = {info.name: as_encoded(info.name, load_tensor(info)) for info in task.tensors}  # expert slices
    # the resident tensors, or the parts of the base storage task.params.storage names
    written = encode_written(weights, task.params)
    tmp = task.out.with_name(task.out.name + ".partial")
    hashes = write_tensor_file(tmp, {k: t for wr in written.values() for k, t in wr.parts.items()},
                               metadata={"tpde_task": str(task.index)})
    bases = {name: wr.base for name, wr in written.items()}
    results = []
    for name, wr in written.items():
        sizes = stored_sizes(wr.parts)
        src = weights[name]
        results.append(
            TensorResult(
                name=name, dtype=str(src.dtype).replace("torch.", ""), shape=list(src.shape),
                checksum=wr.checksum, source_bytes=src.numel() * src.element_size(),
                base_bytes=sizes["base"], delta_bytes=sizes["delta"], meta_bytes=sizes["meta"],
                part_hashes={k: h for k, h in hashes.items() if k.startswith(module_prefix(name) + ".")},
                verified=False,
            )
        )
    del written
    if task.verify:
        try:
            _verify_written(tmp, weights, results, task.params.storage, bases)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, task.out)  # the task file exists only once it has been verified
    return TaskResult(
        index=task.index, out=str(task.out), tensors=results, seconds=time.perf_counter() - t0,
        peak_rss_above_start=max(0, peak_rss() - start_rss), peak_rss=peak_rss(), pid=os.getpid(), own_peak=own_peak,
    )


def _verify_written(path: Path, weights: dict[str, torch.Tensor], results: list[TensorResult],
                    storage: str | None = None, bases: dict[str, dict[str, torch.Tensor]] | None = None) -> None:
    """Decode what is on disk (not what is in memory) and compare it bit for bit with the source."""
    header = read_header(path)
    if storage is not None:  # laid out by a base storage: its decode, its base and the meta's checksum
        for res in results:
            token = f"{module_prefix(res.name)}.{STORAGE_TOKEN}.{storage}."
            parts = {k[len(token):]: load_tensor(header[k]) for k in weight_part_keys(header, module_prefix(res.name))
                     if k.startswith(token)}
            check_written(res.name, storage, parts, weights[res.name], res.checksum, (bases or {})[res.name])
            res.verified = True
        return
    encs = []
    for res in results:
        prefix = module_prefix(res.name)
        parts = {s: load_tensor(header[f"{prefix}.{s}"]) for s in SUFFIXES}
        encs.append(EncodedTensor.from_parts(name=res.name, **parts))
    # Decoded bits equal to the source's, and a stored checksum equal to the one taken from the source,
    # tie the file to the original: hashing the decoded copy again would add nothing.
    decoded = decode_tensors(encs, verify=False)
    for res, enc, w in zip(results, encs, decoded, strict=True):
        if enc.checksum != res.checksum:
            raise TpdeFormatError(res.name, "stored checksum differs from the source's; nothing was written")
        if not _same_bits(w, weights[res.name]):
            raise TpdeFormatError(res.name, "decoded weight differs from the source (codec bug); nothing was written")
        res.verified = True
