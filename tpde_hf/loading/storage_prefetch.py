"""Decode a repo's storage-laid weights on worker threads, ahead of transformers asking for them.

transformers converts one weight at a time on its loading thread. A storage's decode there (``narrow-rans``:
a few rANS passes per weight) either runs on one core, or splits each weight over the cores with a fork and
join per stage (idle cores at every join, and the loading thread's own work between weights idle too). Here
each worker decodes *whole weights* on one core, from the moment the quantizer hands transformers its
converters (:func:`tpde_hf.loading.storage_ops.storage_converters`) on, so the cores stay busy across weights and
transformers' own work on its thread overlaps the decoding. The workers share each storage's derived tables
across the weights they decode (``narrow-rans``: :func:`tpde_hf.codec.storage.table.shared_bins`, one set for
all of them), and a ``narrow-rans`` weight decodes in one compiled call (:mod:`tpde_hf.codec.storage.fused`).

A result is found again by the *content* of the weight's stored parts (xxh3 of the meta, which holds the
weight's checksum, and of each part's dtype, shape and first bytes, with the kind of result), so it needs no
key renaming and is never served for another weight. What
the loading thread takes gets the same checks as a decode of its own (:mod:`tpde_hf.storage_format`); a
decode that fails in a worker is not reported there: the loading thread decodes that weight again and
reports the error under its own name.

Decoded weights waiting to be taken are bounded (:data:`WINDOW_BYTES`): a worker waits for room, and a weight
asked for while the window is full (or after the workers ended) is decoded by the loading thread, which a
worker then skips. Workers are daemon threads that end when the queue is empty, the load closes the prefetch,
or nothing is taken for :data:`IDLE_S` seconds. ``TPDE_STORAGE_PREFETCH=0`` turns the prefetch off.

Example::

    pf = StoragePrefetch(["model.safetensors"], "dequantize")
    w = take("weight", "narrow-rans", parts)      # the decoded tensor, or None (not prefetched, or failed)
"""

from __future__ import annotations

import os
import queue
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import numpy as np
import torch
import xxhash

WINDOW_BYTES = 1 << 30  # decoded bytes that may wait to be taken
IDLE_S = 30.0
HEAD_BYTES = 256  # of each part beside the meta, in a result's key
# the modes whose decode is worth the workers: ``base`` (4-bit codes only) measured no faster with them, and
# slower for a storage whose base decode is a copy (``resident``: 0.069 -> 0.110 s on MiniLM, 2026-12-07)
KINDS = {"dequantize": "weight", "lossless": "resident"}
_active: weakref.WeakSet[StoragePrefetch] = weakref.WeakSet()
_NP_SAFE = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.float16, torch.float32,
            torch.float64, torch.bool}  # dtypes that ``Tensor.numpy()`` takes (not bfloat16)


def content_key(kind: str, storage: str, parts: Mapping[str, torch.Tensor]) -> tuple[str, str, int]:
    """``(kind, storage, xxh3-64 of every part's name, dtype and shape, the ``meta`` part's bytes and the first
    :data:`HEAD_BYTES` of each other part)``: what a result is found by. The meta holds the weight's own checksum
    (and a storage's parts begin with their headers), so two weights with one key have the same content; the
    workers and the loading thread read the same files, so they see the same bytes."""
    h = xxhash.xxh3_64()
    for p in sorted(parts):
        t = parts[p]
        h.update(f"{p}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_head(t, None if p == "meta" else HEAD_BYTES))
    return kind, storage, h.intdigest()


def _head(t: torch.Tensor, n: int | None) -> memoryview:
    """The first ``n`` bytes of ``t`` (all: ``n`` None), through numpy where it can: each torch call would release
    and re-take the GIL, which on a worker waits for the loading thread's Python (measured: listing the jobs took
    36 ms inside a load, 3 ms alone)."""
    if t.device.type == "cpu" and not t.requires_grad and t.is_contiguous() and t.dtype in _NP_SAFE:
        raw = t.numpy().reshape(-1).view(np.uint8)
    else:
        raw = t.detach().cpu().contiguous().view(torch.uint8).reshape(-1).numpy()
    return memoryview(np.ascontiguousarray(raw if n is None else raw[:n])).cast("B")


class _Shard:
    """A safetensors file as views of one memory map (:class:`tpde_hf.integrity.MappedShard`): ``keys()`` and
    ``get_tensor(key)`` like ``safetensors.safe_open``, without a torch call per tensor beyond the view (each
    would be a GIL round trip on a worker, see :func:`_head`). What cannot be a view comes from ``safe_open``. A
    malformed header raises (the workers then list nothing; the loading thread reads the file itself and reports
    it)."""

    def __init__(self, path: str):
        from tpde_hf.integrity import MappedShard

        self.path = path
        self._mapped = MappedShard(path)
        self._fallback: Any = None

    def __enter__(self) -> _Shard:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fallback is not None:
            self._fallback.__exit__(*exc)

    def keys(self) -> list[str]:
        return self._mapped.keys()

    def get_tensor(self, key: str) -> torch.Tensor:
        view = self._mapped.view(key)
        if view is not None:
            return view
        if self._fallback is None:  # a dtype without a view, or unaligned data: safetensors reads it
            from safetensors import safe_open

            self._fallback = safe_open(self.path, framework="pt").__enter__()
        return self._fallback.get_tensor(key)


def _nbytes(result: Any) -> int:
    if isinstance(result, torch.Tensor):
        return result.numel() * result.element_size()
    if isinstance(result, Mapping):
        return sum(_nbytes(v) for v in result.values())
    return 0


def default_workers() -> int:
    """``TPDE_STORAGE_WORKERS``, else the cores this process may run on (at least 1)."""
    env = os.environ.get("TPDE_STORAGE_WORKERS", "").strip()
    if env.isdigit():
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _job(kind: str) -> Callable[[str, str, dict[str, torch.Tensor]], Any]:
    from tpde_hf import storage_format as F

    return {"weight": F.decode_weight_ahead,  # checked against the meta by the loading thread as it takes it
            "resident": lambda n, s, p: F.resident_parts(n, s, p, use_prefetch=False)}[kind]


class StoragePrefetch:
    """Every storage-laid weight of ``files``, decoded for ``mode`` on ``workers`` threads (module docstring)."""

    def __init__(self, files: Sequence[str], mode: str, workers: int | None = None):
        self.kind = KINDS[mode]
        self._files = [str(f) for f in files if str(f).endswith(".safetensors")]
        self._results: dict[tuple, list[Any]] = {}
        self._cond = threading.Condition()
        self._waiting_bytes = 0
        self._closed = False
        self._listing = False
        self._listed = False  # the first worker lists the jobs (the loading thread does not wait for the files)
        self._started: dict[tuple, int] = {}  # being decoded (how many times: identical weights share a key)
        self._pending: dict[tuple, int] = {}  # queued, not started
        self._claimed: set[tuple] = set()  # the loading thread decodes these itself: a worker skips them
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._fn = _job(self.kind)
        self._tables: dict = {}  # the narrow-rans bin tables the workers share (codec.storage.table)
        self._alive = max(1, workers or default_workers())
        for i in range(self._alive):
            threading.Thread(target=self._work, name=f"tpde-storage-prefetch-{i}", daemon=True).start()
        _active.add(self)

    def _list_jobs(self) -> None:
        """Queue every storage-laid weight of the files, in the order transformers loads them."""
        from transformers.core_model_loading import dot_natural_key

        from tpde_hf.storage_format import storage_weights

        try:
            with ExitStack() as files:  # each file opened once (its header parsed once)
                handles = {f: files.enter_context(_Shard(f)) for f in self._files}
                weights = [(w, fh) for fh in handles.values() for w in storage_weights(fh.keys()).values()]
                weights.sort(key=lambda wf: dot_natural_key(wf[0].name))
                for w, fh in weights:  # queued one by one: the other workers start on the first
                    self._put(w.name, w.storage, {p: fh.get_tensor(k) for p, k in w.parts.items()})
        finally:
            with self._cond:
                self._listed = True
                self._cond.notify_all()

    def _put(self, name: str, storage: str, parts: dict[str, torch.Tensor]) -> None:
        key = content_key(self.kind, storage, parts)
        with self._cond:
            self._queue.put((name, storage, parts, key))
            self._pending[key] = self._pending.get(key, 0) + 1
            self._cond.notify_all()

    def _work(self) -> None:
        try:
            self._work_loop()
        finally:
            with self._cond:
                self._alive -= 1
                self._cond.notify_all()

    def _work_loop(self) -> None:
        from tpde_hf.codec.backend import limit_codec_threads

        limit_codec_threads(1)  # one weight per core: no second level of threads
        try:
            from tpde_hf.codec.storage.table import shared_bins
        except ImportError:  # no narrow-rans in this build
            from contextlib import nullcontext

            def shared_bins(_tables: dict) -> nullcontext:
                return nullcontext()
        with self._cond:
            first, self._listing = not self._listing, True
        if first:
            try:
                self._list_jobs()
            except Exception:  # noqa: BLE001 - an unreadable file: the loading thread meets it and reports it
                pass
        with shared_bins(self._tables):  # one set of bins for all the workers: each bin built once per load
            while True:
                with self._cond:  # the next job, once there is room in the window (else give up)
                    self._cond.wait_for(lambda: self._listed or self._closed or not self._queue.empty())
                    if self._closed or self._queue.empty():
                        return
                    if not self._cond.wait_for(lambda: self._closed or self._waiting_bytes < WINDOW_BYTES, IDLE_S) \
                            or self._closed:
                        return
                    if self._queue.empty():  # another worker took the last job while this one waited
                        continue
                    name, storage, parts, key = self._queue.get_nowait()
                    self._pending[key] -= 1
                    if key in self._claimed:
                        continue
                    self._started[key] = self._started.get(key, 0) + 1
                try:
                    result = self._fn(name, storage, parts)
                except Exception:  # noqa: BLE001 - the loading thread decodes it again and reports it, by its name
                    result = None
                with self._cond:
                    if result is not None and not self._closed:
                        self._results.setdefault(key, []).append(result)
                        self._waiting_bytes += _nbytes(result)
                    self._started[key] -= 1
                    self._cond.notify_all()

    def take(self, key: tuple) -> tuple[bool, Any]:
        """``(True, result)`` for a weight with this content key once decoded: waits while a worker decodes it, or
        will (it is queued, a worker runs and the window has room). ``(False, None)`` if none will: it is not in
        the files, its decode failed, or no worker is left; the weight is then the caller's to decode."""
        if key[0] != self.kind:
            return False, None

        def ready() -> bool:
            if self._closed or self._results.get(key) or self._started.get(key, 0):
                return bool(self._closed or self._results.get(key))
            if self._pending.get(key, 0):  # queued: a worker will take it, unless none is left or room is
                return self._alive == 0 or self._waiting_bytes >= WINDOW_BYTES
            return self._listed  # not queued (yet): only the complete list says it never will be

        with self._cond:
            self._cond.wait_for(ready)
            got = self._results.get(key)
            if not got:
                self._claimed.add(key)
                return False, None
            result = got.pop()
            if not got:
                del self._results[key]
            self._waiting_bytes -= _nbytes(result)
            self._cond.notify_all()
            return True, result

    def close(self) -> None:
        """Stop the workers after their current weight and drop what was not taken."""
        with self._cond:
            self._closed = True
            self._results.clear()
            self._waiting_bytes = 0
            self._cond.notify_all()
        _active.discard(self)


def take(kind: str, storage: str, parts: Mapping[str, torch.Tensor]) -> tuple[bool, Any]:
    """A prefetched result of ``kind`` (``weight``, ``resident``) for these stored parts, from any
    prefetch in flight: ``(True, result)`` or ``(False, None)``."""
    pfs = [pf for pf in list(_active) if pf.kind == kind]
    if not pfs:
        return False, None
    key = content_key(kind, storage, parts)
    for pf in pfs:
        found, result = pf.take(key)
        if found:
            return True, result
    return False, None


def start(hf_quantizer: Any, mode: str) -> StoragePrefetch | None:
    """Start the prefetch of a load (once per quantizer); None where there is nothing to decode or it cannot
    start (the loading thread then decodes, and reports any problem, as without it)."""
    pf = getattr(hf_quantizer, "_tpde_storage_prefetch", None)
    if pf is not None or mode not in KINDS or os.environ.get("TPDE_STORAGE_PREFETCH", "1") == "0":
        return pf or None
    try:
        files = getattr(hf_quantizer, "_tpde_checkpoint_files", None) or []
        pf = StoragePrefetch(files, mode)
    except Exception:  # noqa: BLE001 - an unreadable file: the loading thread meets it and reports it clearly
        pf = None
    hf_quantizer._tpde_storage_prefetch = pf or False
    return pf


def close(hf_quantizer: Any) -> None:
    """Close the prefetch of ``hf_quantizer``'s load, if any (after loading)."""
    pf = getattr(hf_quantizer, "_tpde_storage_prefetch", None)
    if pf:
        pf.close()
