"""Decode a chain of checkpoint entries as one graph of tensor jobs, and restore files from it.

:func:`tpde_hf.checkpoints.store.decode_entry` decodes one entry stage by stage (every ``exp_avg``, then every
``exp_avg_sq``, then the rest), each stage a barrier. Here every tensor of every link is one job, and a job
reads only its parameter's tensors (:func:`_group`: an optimizer state of parameter ``i`` and the weight
``param_names[i]``; any other tensor only itself) of the previous link and, for a weight, of its own link, as
:func:`~tpde_hf.checkpoints.predict.sources` picks them. So a job is queued once those are decoded, and the
ready jobs run parameter first, then link: a parameter goes through every link while its values are still in
cache, no thread waits at the end of a link, and once a parameter's jobs of link ``i + 1`` are done its
arrays of link ``i`` are decoded into again by link ``i + 2`` (a few MB per parameter instead of a whole
checkpoint per link: few fresh pages to fault in, which cost 5-9 us of system time each on this VM). The first link
decodes while the later ones are read. With :func:`restore_files` each file is written while the chain
decodes, piece by piece in file order.

Each job sees exactly what the stage-by-stage decoder gives it: ``options`` gets mappings whose keys are the
tensors of the earlier stages of its own link (in the same order) and all tensors of the previous link; reading
a value not decoded yet runs that job on the reading thread if no thread has started it, else waits for it (so
a read beyond the parameter's tensors is still right, and cannot deadlock). Entry files are read through a
memory map (:class:`tpde_hf.integrity.MappedShard`): nothing is copied before a kernel reads it, unaligned
payload parts included. Every per-tensor checksum and every file hash is checked as before.

Python's cyclic collector is paused while a chain decodes: a full collection walks every object of the process
holding the GIL.

An ``exp_avg``, ``exp_avg_sq`` or weight is decoded with Adam's features formed inside the decoder
(:func:`tpde_hf.checkpoints.dec_features.decode`: no feature arrays written and read back); where that path
does not apply or declines, the job decodes the ordinary way (``predict.options`` and the codec), which names
any fault as before.

Example::

    dec = decode_links([entry_60, entry_40], start=plain_80)     # checkpoint-40, decoded through 60
    restore_files([entry_60, entry_40], plain_80, {"model.safetensors": Path("out/model.safetensors")})
"""

from __future__ import annotations

import heapq
import os
import threading
from collections.abc import Iterator, Mapping, Sequence
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
from tpde_hf.checkpoints.predict import _role
from tpde_hf.codec.registry import TENSOR_CODECS, CodecContext, group_coded_keys
from tpde_hf.errors import TpdeFormatError
from tpde_hf.gc_pause import pause as pause_gc
from tpde_hf.integrity import MappedShard


class _Failed(Exception):
    """A tensor this job reads failed to decode (that job's own error is the one reported)."""


class _Job:
    """One tensor of one link: its future, its place in the queue and the jobs it waits for."""

    __slots__ = ("i", "key", "pos", "prio", "group", "fut", "state", "need", "after", "cur", "prev", "released")

    def __init__(self, i: int, key: str, pos: int, prio: tuple, group: Any):
        self.i, self.key, self.pos, self.prio, self.group = i, key, pos, prio, group
        self.fut: Future = Future()
        self.state = 0  # 0 not started, 1 running, 2 settled
        self.need = 0  # jobs it waits for, not settled yet
        self.after: list[_Job] = []  # jobs that wait for it
        self.cur: Mapping | None = None
        self.prev: Mapping | None = None
        self.released = False  # its array was handed to a later link: no one may read it any more

    def __lt__(self, other: _Job) -> bool:
        return self.prio < other.prio


class _View(Mapping):
    """Tensors of one link as a mapping: ``keys`` are fixed; reading a value that is not decoded yet runs that job
    on the reading thread if no thread has started it (so a read never waits for a job no thread will run), else
    waits for it."""

    def __init__(self, keys: list[str], jobs: dict[str, _Job], chain: ChainDecode):
        self._keys, self._set, self._jobs, self._chain = keys, set(keys), jobs, chain

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._set:
            raise KeyError(key)
        job = self._jobs[key]
        if job.released:  # cannot be: only the jobs of its group in the next link read it, all settled
            raise RuntimeError(f"{key} was read after its array was reused")
        if not job.fut.done():
            self._chain._help(job)
        if job.fut.exception() is not None:
            raise _Failed() from None
        return job.fut.result()

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._set


_GONE: Future = Future()  # what a let-go job holds instead of its tensor
_GONE.set_result(None)


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
        self.index = -1  # its place in the chain
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


def _group(key: str, names: Sequence[str] | None) -> Any:
    """The tensors ``key``'s decode may read are its group's (:func:`predict.sources`): an optimizer state of
    parameter ``i`` and the weight named ``names[i]`` read only group ``i`` of their own and of the previous
    link; any other tensor reads only itself in the previous link."""
    role, idx, _ = _role(key)
    if role < 2:
        return idx
    name = key.split(":", 1)[1] if ":" in key else None
    if names and name in names:
        return list(names).index(name)
    return ("key", key)


class ChainDecode:
    """Every tensor of every link of a chain as a job (see the module docstring), run parameter by parameter.

    ``paths``: entries in decoding order; ``start``: what the first is coded against (None: a keyframe).
    A tensor of link ``i + 1`` reads only its group's tensors (:func:`_group`) of links ``i`` and ``i + 1``, so
    a job starts once those are decoded, and the ready jobs run group first, then link: one parameter goes
    through every link while its parent values are still in cache, no thread waits for a whole link, and
    once a group's jobs of link ``i + 1`` are done its arrays of link ``i`` are decoded into again by link
    ``i + 2`` (a few MB per group, not a checkpoint per link: few fresh pages to fault in).
    ``futures[i][key]``: the job of a tensor of link ``i`` (those of a let-go group are removed; only the last
    link's stay). :meth:`result`: the last link, decoded.
    """

    def __init__(self, paths: list[Path], start: S.Decoded | None, threads: int | None = None):
        if not paths:
            raise ValueError("an empty chain")
        self.links: list[_Link] = []
        self.futures: list[dict[str, Future]] = []
        self._jobs: list[dict[str, _Job]] = []
        self._made: list[dict[str, np.ndarray]] = []  # each link's outputs of the fused decoder, by key
        self._members: list[dict[Any, list[_Job]]] = []  # each link's jobs by group
        self._readers: list[dict[Any, int]] = []  # per link and group: its jobs not settled yet
        self._spare: dict[int, list[np.ndarray]] = {}
        self._threads: list[threading.Thread] = []
        self._closed, self._building = False, True
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._errors: list[tuple[int, BaseException]] = []  # (queue position, error) of jobs that failed
        self._left = self._pos = 0  # jobs not settled; jobs made (a job's queue position)
        self._ready: list[_Job] = []  # a heap: group, then link
        self._rank: dict[Any, int] = {}  # groups in the order the first link names them (largest first)
        self._prev: Mapping[str, torch.Tensor] | None = start.tensors if start is not None else None
        self._codec = TENSOR_CODECS.get(S.CODEC)
        self.workers = max(1, min(threads if threads is not None else numba.get_num_threads(), os.cpu_count() or 1))
        self._resume_gc = pause_gc()  # until close(): the links' setup makes many objects too
        parent_name = start.name if start is not None else None
        skel = start.skeletons if start is not None else None
        try:
            for p in paths:  # the first link decodes while the next ones are read
                link = _Link(Path(p), parent_name, skel)
                with self._cond:
                    self._add(link)
                if self.workers > 1 and not self._threads:
                    for _ in range(self.workers):
                        t = threading.Thread(target=self._work, name="tpde-chain", daemon=True)
                        t.start()
                        self._threads.append(t)
                parent_name, skel = link.name, link.skeletons
        except BaseException:
            self.close()
            raise
        with self._cond:
            self._building = False
            self._cond.notify_all()
        if self.workers == 1:  # one thread: in order, on this thread (its chunk loops on numba's threads)
            while self._ready:
                job = heapq.heappop(self._ready)
                if job.state == 0:
                    job.state = 1
                    self._run(job, K.is_serial())

    def _add(self, link: _Link) -> None:
        """Link ``link``'s jobs, what each waits for, the ready ones queued (called under the lock)."""
        i = link.index = len(self.links)
        self.links.append(link)
        futs: dict[str, Future] = {}
        jobs: dict[str, _Job] = {}
        members: dict[Any, list[_Job]] = {}
        self.futures.append(futs)
        self._jobs.append(jobs)
        self._made.append({})
        self._members.append(members)
        seen: list[str] = []
        for si, stage in enumerate(link.order):
            cur = _View(list(seen), jobs, self)
            for key in stage:
                g = _group(key, link.names)
                job = _Job(i, key, self._pos, (self._rank.setdefault(g, len(self._rank)), i, si, self._pos), g)
                self._pos += 1
                job.cur, job.prev = cur, self._prev
                jobs[key], futs[key] = job, job.fut
                job.fut.add_done_callback(lambda f, job=job: self._settle(job, f))
                deps = list(self._members[i - 1].get(g, ())) if i else []
                if _role(key)[0] == 2:  # a weight reads its own link's optimizer state too
                    deps += [d for d in members.get(g, ()) if d.prio[2] < si]
                live = [d for d in deps if d.state != 2]  # a settled one no longer counts down
                for d in live:
                    d.after.append(job)
                job.need = len(live)
                members.setdefault(g, []).append(job)
                if job.need == 0:
                    heapq.heappush(self._ready, job)
            seen += stage
        self._left += len(jobs)
        self._readers.append({g: len(js) for g, js in members.items()})
        self._prev = _View(list(jobs), jobs, self)
        self._cond.notify_all()

    def _work(self) -> None:
        """A worker: the first ready job (group, then link), until every job settled or the chain is closed."""
        while True:
            with self._cond:
                while not self._ready and (self._left or self._building) and not self._closed:
                    self._cond.wait()
                if self._closed or not self._ready:
                    return
                job = heapq.heappop(self._ready)
                if job.state != 0:  # a reader already ran it
                    continue
                job.state = 1
            self._run(job, True)

    def _help(self, job: _Job) -> None:
        """A reader needs ``job``: run it here if no thread has started it (else the caller waits for it)."""
        with self._lock:
            if job.state != 0:
                return
            job.state = 1
        self._run(job, K.is_serial() if self.workers == 1 else True)

    def _run(self, job: _Job, serial: bool) -> None:
        try:
            value = self._decode(self.links[job.i], job.key, job.cur, job.prev, serial)
        except BaseException as exc:  # noqa: BLE001 - kept in the future, raised in queue order by check()
            job.fut.set_exception(exc)
        else:
            job.fut.set_result(value)

    def _settle(self, job: _Job, f: Future) -> None:
        """``job`` settled: its error noted, the jobs waiting for it queued, and its group's arrays of the link
        before let go once every job of that group reading them settled."""
        exc = None if f.cancelled() else f.exception()
        with self._cond:
            job.state = 2
            if exc is not None and not isinstance(exc, _Failed):
                self._errors.append((job.pos, exc))
            for a in job.after:
                a.need -= 1
                if a.need == 0 and a.state == 0:
                    heapq.heappush(self._ready, a)
            i, g = job.i, job.group
            self._readers[i][g] -= 1
            if i >= 1 and self._readers[i][g] == 0:
                self._let_go(i - 1, g)
            self._left -= 1
            self._cond.notify_all()

    def _let_go(self, i: int, g: Any) -> None:
        """Link ``i``'s tensors of group ``g`` are read no more (called under the lock): their futures go, and their
        arrays become spares if no job has failed and every one of them settled (a failure can settle a job
        before the ones it reads)."""
        group = self._members[i].get(g, [])
        reuse = not self._errors and all(j.state == 2 for j in group)
        for j in group:
            if j.state != 2:  # still running (its readers were cancelled): it settles as usual
                continue
            self.futures[i].pop(j.key, None)
            j.released, j.fut = True, _GONE  # its tensor is not held any more
            a = self._made[i].pop(j.key, None)
            if reuse and a is not None:
                self._spare.setdefault(a.shape[0], []).append(a)

    def _take(self, n: int) -> np.ndarray | None:
        """A spare int32 array of ``n`` elements (a let-go group's output), or None."""
        with self._lock:
            left = self._spare.get(n)
            return left.pop() if left else None

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
                        self._made[link.index][key] = fast.view(torch.int32).numpy()
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
        with self._cond:
            while (self._left or self._building) and not self._closed:
                self._cond.wait()
        if self._errors:
            raise min(self._errors, key=lambda e: e[0])[1]
        if self._left:
            raise RuntimeError("the chain was closed before it decoded")

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
        """Stop the workers (a running job finishes); jobs not started are cancelled, so no one waits for them."""
        with self._lock:
            self._closed = True
            pending = [j for js in self._jobs for j in js.values() if j.state == 0]
            for j in pending:
                j.state = 1
            self._cond.notify_all()
        for j in pending:
            j.fut.cancel()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()
        self._threads = []
        self._spare.clear()
        self._resume_gc()  # a no-op after the first call


def decode_links(paths: list[Path], start: S.Decoded | None, threads: int | None = None) -> S.Decoded:
    """Decode ``paths`` in turn, the first against ``start`` (None: a keyframe); the last one, decoded."""
    return ChainDecode(paths, start, threads).result()


def _write_streamed(futures: Mapping[str, Future], last: _Link, rec: dict[str, Any], path: Path) -> None:
    """Write file ``rec`` of the last link to ``path`` in file order, each tensor once its job is done
    (:func:`~tpde_hf.checkpoints.store.file_pieces`, the checks of every file rebuild), hashed on the way; the file
    is kept only if the hash matches. A tensor whose job failed stops the write (that error is raised by the
    chain's result)."""
    def tensor(key: str) -> torch.Tensor | None:
        fut = futures.get(key)
        return None if fut is None else fut.result()  # raises the job's error (or CancelledError): nothing is kept

    label = f"{last.name}/{rec['name']}"
    S.write_pieces(label, rec, S.file_pieces(label, rec, last.skeletons[rec["name"]], tensor), path)


def restore_files(paths: list[Path], start: S.Decoded | None, targets: dict[str, Path],
                  threads: int | None = None) -> S.Decoded:
    """Decode the chain and write file ``name`` of its last checkpoint to ``targets[name]``; returns the last
    checkpoint, decoded.

    A file is written while the chain decodes, piece by piece in file order, each tensor as soon as it is
    decoded (:func:`_write_streamed`): to a staging name beside its target, hashed on the way, kept only if the
    hash matches; every staged file is moved into place only once the whole chain has decoded without an error
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
        _write_streamed(chain.futures[-1], last, recs[name], staged[name])

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
