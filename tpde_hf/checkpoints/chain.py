"""Decode a chain of checkpoint entries as one graph of tensor jobs, and restore files from it.

:func:`tpde_hf.checkpoints.store.decode_entry` decodes one entry stage by stage (every ``exp_avg``, then every
``exp_avg_sq``, then the rest), each stage a barrier. Here every tensor of every link is one job, and a job waits
only for the tensors it reads: the same tensor of the previous link (its reference) and the feature tensors
:func:`~tpde_hf.checkpoints.predict.options` asks for. So a link's ``exp_avg`` decode while the previous link's
weights still decode, the cores stay busy across links, and with :func:`restore_files` a file is written (hashed,
then moved into place) as soon as its tensors of the last link are there, while the rest still decodes.

Each job sees exactly what the stage-by-stage decoder gives it: ``options`` gets mappings whose keys are the
tensors of the earlier stages of its own link (in the same order) and all tensors of the previous link; reading
a value waits for that tensor. Jobs are queued in the stage-by-stage order, so a job only ever waits for jobs
queued before it: no deadlock. At most ``threads`` jobs compute at once (a job waiting for another gives its turn
away). Entry files are read through a memory map (:class:`tpde_hf.integrity.MappedShard`): nothing is copied
before a kernel reads it. Every per-tensor checksum and every file hash is checked as before.

Once a link is let go (the next one is decoded, no job failed), the arrays the fused decoder made for it are
decoded into again by a later link (same shapes: no fresh pages to fault in and zero). Python's cyclic collector
is paused while a chain decodes: a full collection walks every object of the process holding the GIL.

An ``exp_avg``, ``exp_avg_sq`` or weight is decoded with Adam's features formed inside the decoder
(:func:`tpde_hf.checkpoints.dec_features.decode`: no feature arrays written and read back); where that path
does not apply or declines, the job decodes the ordinary way (``predict.options`` and the codec), which names
any fault as before.

Example::

    dec = decode_links([entry_60, entry_40], start=plain_80)     # checkpoint-40, decoded through 60
    restore_files([entry_60, entry_40], plain_80, {"model.safetensors": Path("out/model.safetensors")})
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch
import zstandard

from tpde_hf.checkpoints import dec_features as F
from tpde_hf.checkpoints import kernels as K
from tpde_hf.checkpoints import predict
from tpde_hf.checkpoints import store as S
from tpde_hf.codec.registry import TENSOR_CODECS, CodecContext, group_coded_keys
from tpde_hf.errors import TpdeFormatError
from tpde_hf.gc_pause import pause as pause_gc
from tpde_hf.integrity import MappedShard


class _Failed(Exception):
    """A tensor this job reads failed to decode (that job's own error is the one reported)."""


class _Turns:
    """At most ``n`` jobs compute at once; a job that waits for another tensor gives its turn away."""

    def __init__(self, n: int):
        self._sem = threading.Semaphore(n)
        self._local = threading.local()

    def __enter__(self) -> None:
        self._sem.acquire()
        self._local.held = True

    def __exit__(self, *exc: object) -> None:
        self._local.held = False
        self._sem.release()

    def wait(self, fut: Future) -> Any:
        if not fut.done() and getattr(self._local, "held", False):
            self._sem.release()
            try:
                fut.exception()
            finally:
                self._sem.acquire()
        if fut.exception() is not None:
            raise _Failed() from None
        return fut.result()


class _View(Mapping):
    """Tensors of one link as a mapping: ``keys`` are fixed, reading a value waits for its job."""

    def __init__(self, keys: list[str], futures: dict[str, Future], turns: _Turns):
        self._keys, self._set, self._futures, self._turns = keys, set(keys), futures, turns

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._set:
            raise KeyError(key)
        return self._turns.wait(self._futures[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._set


def _done(value: Any) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


def _part(shard: MappedShard, key: str) -> torch.Tensor:
    """One stored part, a view of the map where it is aligned, else a copy."""
    t = shard.view(key)
    if t is not None:
        return t
    st = shard.header.tensors[key]
    with open(shard.header.path, "rb") as fh:
        fh.seek(st.begin)
        data = fh.read(st.end - st.begin)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


class _Link:
    """One entry of the chain: its manifest, map, coded tensor groups (in decoding order) and skeletons."""

    def __init__(self, path: Path, parent_name: str | None, parent_skeletons: dict[str, bytes] | None):
        self.path = path
        self.manifest = S.read_manifest(path)
        want = self.manifest.get("parent")
        if want != parent_name:
            raise TpdeFormatError(str(path), f"entry is a delta against {want!r}, decoded against {parent_name!r}")
        self.name = self.manifest["name"]
        self.names = self.manifest.get("param_names")
        self.backward = self.manifest.get("version") == S.BACKWARD_VERSION
        try:
            self.shard = MappedShard(path)
            self.groups = group_coded_keys([k for k in self.shard.keys() if not k.startswith("skeleton.")])
            self.order: list[list[str]] = []  # stage by stage, largest first, as decode_entry orders them
            for stage in predict.stages(list(self.groups)):
                self.order.append(sorted(stage, key=lambda k: -int(bool(self.groups[k].parts)) * self._numel(k)))
            # each coded tensor's stored dtype and size: a backward exp_avg_sq need not wait for its exp_avg
            self.stored = F.stored_sizes({k: self._meta(k) for k in self.groups})
            self.skeletons = {}
            for i, rec in enumerate(self.manifest["files"]):
                blob = _part(self.shard, f"skeleton.{i}").numpy().tobytes()
                self.skeletons[rec["name"]] = S.skeleton_bytes(blob, parent_skeletons, rec)
        except TpdeFormatError as exc:
            raise TpdeFormatError(str(path), str(exc)) from None
        except (zstandard.ZstdError, KeyError, TypeError, ValueError, RuntimeError, OSError) as exc:
            raise TpdeFormatError(str(path), f"corrupt checkpoint entry ({type(exc).__name__}: {exc})") from None

    def _meta(self, key: str) -> np.ndarray:
        try:
            return _part(self.shard, self.groups[key].parts["meta"]).numpy().view(np.int64)
        except Exception:  # noqa: BLE001 - only a hint; a bad part fails clearly in its job
            return np.zeros(0, np.int64)

    def _numel(self, key: str) -> int:
        try:
            return int(np.prod(self.shard.view(self.groups[key].parts["shape"]).tolist()))
        except Exception:  # noqa: BLE001 - only an ordering hint; a bad part fails clearly in its job
            return 0


class ChainDecode:
    """Every tensor of every link of a chain as a queued job (see the module docstring).

    ``paths``: entries in decoding order; ``start``: what the first is coded against (None: a keyframe).
    ``futures[i][key]``: the job of a tensor of link ``i``; a link's tensors are let go once the next link is
    decoded (only the last link's stay). :meth:`result`: the last link, decoded.
    """

    def __init__(self, paths: list[Path], start: S.Decoded | None, threads: int | None = None):
        if not paths:
            raise ValueError("an empty chain")
        self.links: list[_Link] = []
        self._pool: ThreadPoolExecutor | None = None
        self._spare: dict[int, list[np.ndarray]] = {}
        self._resume_gc = pause_gc()  # until close(): the links' setup makes many objects too
        parent_name = start.name if start is not None else None
        skel = start.skeletons if start is not None else None
        try:
            for p in paths:
                link = _Link(Path(p), parent_name, skel)
                self.links.append(link)
                parent_name, skel = link.name, link.skeletons
        except BaseException:
            self.close()
            raise
        self.workers = max(1, min(threads if threads is not None else numba.get_num_threads(), os.cpu_count() or 1))
        self._turns = _Turns(self.workers)
        self._codec = TENSOR_CODECS.get(S.CODEC)
        self._lock = threading.Lock()
        self._left = [sum(len(s) for s in link.order) for link in self.links]  # jobs not finished, per link
        self._done = [threading.Event() for _ in self.links]
        self._errors: list[tuple[int, BaseException]] = []  # (queue position, error) of jobs that failed
        self.futures: list[dict[str, Future]] = [{} for _ in self.links]
        # each link's outputs of the fused decoder (arrays this chain made); once a link is let go they are
        # decoded into again by a later link (same shapes): no new pages to fault in and zero per link
        self._made: list[dict[str, np.ndarray]] = [{} for _ in self.links]
        prev: Mapping[str, torch.Tensor] | None = start.tensors if start is not None else None
        self._pool = ThreadPoolExecutor(2 * self.workers + 2) if self.workers > 1 else None
        pos = 0
        try:
            for i, link in enumerate(self.links):
                futs = self.futures[i]
                seen: list[str] = []
                if not self._left[i]:
                    self._finished(i)
                for stage in link.order:
                    cur = _View(list(seen), futs, self._turns)
                    for key in stage:
                        if self._pool is None:  # one thread: in order, on this thread
                            futs[key] = self._run(link, key, cur, prev)
                        else:
                            futs[key] = self._pool.submit(self._job, link, key, cur, prev)
                        futs[key].add_done_callback(lambda f, i=i, pos=pos: self._settle(i, pos, f))
                        pos += 1
                    seen += stage
                prev = _View([k for stage in link.order for k in stage], futs, self._turns)
        except BaseException:
            self.close()
            raise

    def _settle(self, i: int, pos: int, f: Future) -> None:
        exc = None if f.cancelled() else f.exception()
        with self._lock:
            if exc is not None and not isinstance(exc, _Failed):
                self._errors.append((pos, exc))
            self._left[i] -= 1
            if self._left[i] == 0:
                self._finished(i)

    def _finished(self, i: int) -> None:
        """Link ``i`` settled (called under the lock): link ``i - 1`` fed only link ``i``, so its tensors go, and
        its arrays become spares if no job has failed (a failure can settle a link before the one it reads,
        whose jobs may then still be running)."""
        self._done[i].set()
        if i >= 1 and i < len(self.links):
            self.futures[i - 1].clear()
            made, self._made[i - 1] = self._made[i - 1], {}
            if not self._errors and self._done[i - 1].is_set():
                for a in made.values():
                    self._spare.setdefault(a.shape[0], []).append(a)

    def _take(self, n: int) -> np.ndarray | None:
        """A spare int32 array of ``n`` elements (a let-go link's output), or None."""
        with self._lock:
            left = self._spare.get(n)
            return left.pop() if left else None

    def _run(self, link: _Link, key: str, cur: Mapping, prev: Mapping | None) -> Future:
        f: Future = Future()
        try:
            f.set_result(self._decode(link, key, cur, prev, K.is_serial()))
        except BaseException as exc:  # noqa: BLE001 - kept in the future, raised in queue order by check()
            f.set_exception(exc)
        return f

    def _job(self, link: _Link, key: str, cur: Mapping, prev: Mapping | None) -> torch.Tensor:
        with self._turns:
            return self._decode(link, key, cur, prev, True)

    def _decode(self, link: _Link, key: str, cur: Mapping, prev: Mapping | None, serial: bool) -> torch.Tensor:
        try:
            with K.serial(serial):  # one tensor per thread, its chunks on this thread (numba's pool is shared)
                g = link.groups[key]
                if g.codec != S.CODEC:
                    raise TpdeFormatError(key, f"unexpected codec {g.codec!r} in a checkpoint entry")
                parts = {p: _part(link.shard, k) for p, k in g.parts.items()}
                # Adam's features formed inside the decoder; None: not an Adam tensor, or it declined
                fast = F.decode(key, parts, cur, prev, link.names, link.backward, stored=link.stored,
                                spare=self._take)
                if fast is not None:
                    fast = fast.reshape(-1)
                    with self._lock:
                        self._made[self.links.index(link)][key] = fast.view(torch.int32).numpy()
                    return fast
                opts = predict.options(key, cur, prev, link.names, backward=link.backward)
                ref = prev.get(key) if prev is not None else None
                return self._codec.decode(parts, CodecContext(key, ref, opts)).reshape(-1)
        except _Failed:
            raise
        except TpdeFormatError as exc:
            raise TpdeFormatError(str(link.path), str(exc)) from None
        except (KeyError, TypeError, ValueError, RuntimeError, OSError) as exc:
            raise TpdeFormatError(str(link.path), f"corrupt checkpoint entry ({type(exc).__name__}: {exc})") from None

    def check(self) -> None:
        """Wait for every job; raise the first error in queue order. It is a job's own: a job that failed only
        because a tensor it reads failed was queued after that one."""
        for ev in self._done:
            ev.wait()
        if self._errors:
            raise min(self._errors, key=lambda e: e[0])[1]

    def result(self) -> S.Decoded:
        """The last link, decoded (every job checked)."""
        try:
            self.check()
        finally:
            self.close()
        last = self.links[-1]
        dec = S.Decoded(last.name, manifest=last.manifest, skeletons=last.skeletons)
        for stage in last.order:
            for key in stage:
                dec.tensors[key] = self.futures[-1][key].result()
        return dec

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self._spare.clear()
        self._resume_gc()  # a no-op after the first call


def decode_links(paths: list[Path], start: S.Decoded | None, threads: int | None = None) -> S.Decoded:
    """Decode ``paths`` in turn, the first against ``start`` (None: a keyframe); the last one, decoded."""
    return ChainDecode(paths, start, threads).result()


def restore_files(paths: list[Path], start: S.Decoded | None, targets: dict[str, Path],
                  threads: int | None = None) -> S.Decoded:
    """Decode the chain and write file ``name`` of its last checkpoint to ``targets[name]``; returns the last
    checkpoint, decoded.

    A file is written as soon as its tensors are decoded, while the rest still decodes: to a staging name
    beside its target (:func:`~tpde_hf.checkpoints.store.write_file`: hashed on the way, kept only if the hash
    matches), and every staged file is moved into place only once the whole chain has decoded without an error
    (else they are removed): all the files or none, as when the chain was decoded first.
    """
    chain = ChainDecode(paths, start, threads)
    last = chain.links[-1]
    recs = {r["name"]: r for r in last.manifest["files"]}
    missing = sorted(set(targets) - set(recs))
    if missing:
        chain.close()
        raise ValueError(f"no file(s) {missing} in checkpoint {last.name}")
    staged = {n: t.with_name(f".{t.name}.restoring") for n, t in targets.items()}

    def write(name: str) -> None:
        tensors = {}
        for k in (r[0] for r in recs[name]["ranges"]):
            f = chain.futures[-1].get(k)
            if f is None or f.exception() is not None:
                return  # the decode's own error is raised by result(); a missing key by write_file
            tensors[k] = f.result()
        S.write_file(S.Decoded(last.name, tensors, last.skeletons, last.manifest), name, staged[name])

    # files whose tensors come first in the last link (optimizer state: the first stages) first
    first = {k: i for i, k in enumerate(k for stage in last.order for k in stage)}
    order = sorted(targets, key=lambda n: max((first.get(r[0], 0) for r in recs[n]["ranges"]), default=-1))
    ok = False
    try:
        with ThreadPoolExecutor(2) as writers:
            jobs = [writers.submit(write, n) for n in order]
            try:
                dec = chain.result()
            finally:
                for j in jobs:
                    j.exception()  # no file is left half-written when an error leaves
            for j in jobs:
                j.result()
        for n in order:
            if not staged[n].exists():  # write() returned early: cannot be, the decode raised
                raise TpdeFormatError(f"{last.name}/{n}", "was not restored")
            os.replace(staged[n], targets[n])
        ok = True
    finally:
        chain.close()  # already closed by result(), unless an error came first
        if not ok:
            for p in staged.values():
                p.unlink(missing_ok=True)
    return dec
