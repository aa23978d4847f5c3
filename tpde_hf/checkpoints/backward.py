"""Backward deltas: the newest checkpoint stays as Trainer wrote it, each older one is a delta against the next.

When checkpoint N+1 is written, :func:`advance` hard-links its files into the store
(``.tpde-checkpoints/checkpoint-N+1.raw/``: Trainer's rotation may delete the folder, the store keeps the
bytes) and re-codes checkpoint N as an exact delta *against N+1* (a version-2 entry). So:

* resuming from the newest checkpoint reads its files as they are: no decode, no extra step;
* restoring an older one decodes the links from it up to the newest (or up to a keyframe): a keyframe
  (N coded alone) is written whenever the run of deltas older than N that would chain through it
  reaches ``keyframe_every - 1``, so restoring any checkpoint decodes at most ``keyframe_every`` entries;
* deleting the oldest checkpoint (``save_total_limit``) needs no rebase: nothing depends on it.
  :func:`tpde_hf.checkpoints.api.collect` rebases what depended on a checkpoint deleted in the middle.

Crash safety, in order: the entry is written under a temporary name, checked (every payload checked at
encode time, the bytes on disk read back, every file's hash), moved into place with ``os.replace``; then
N's pointer is written, N's large files are deleted, and N's hold is dropped. Until the pointer exists
N's own files are in place; an older entry coded against N finds N's hold, or its entry once the
hold is gone, and both give the same bytes.

Example::

    advance("out/checkpoint-60", param_names=names)   # holds 60, packs 40 against it
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tpde_hf.checkpoints import enc_buffers, predict
from tpde_hf.checkpoints import store as S
from tpde_hf.codec.registry import TENSOR_CODECS, CodecContext, stored_parts
from tpde_hf.errors import TpdeFormatError

#: Files that stay in a packed folder: Trainer's small JSON/args files (the rest go into the entry).
_KEEP_SMALL = S.KEEP_FILE


def step_of(name: str) -> int | None:
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else None


def hold_raw(root: Path, ckpt_dir: Path) -> Path:
    """Hard-link every file of ``ckpt_dir`` into the store's ``<name>.raw`` (a copy where a link fails).

    Built under a temporary name and renamed, so a hold is complete or absent.
    """
    dst = S.raw_path(root, ckpt_dir.name)
    if dst.is_dir():
        if not _same_files(dst, ckpt_dir):
            raise TpdeFormatError(str(dst), f"the store holds other files for {ckpt_dir.name} (a checkpoint of the "
                                            "same name was written again: call forget() before writing it)")
        return dst
    tmp = Path(tempfile.mkdtemp(prefix=f".{ckpt_dir.name}.", suffix=".rawtmp", dir=root))
    try:
        for p in sorted(ckpt_dir.iterdir()):
            if p.is_file() and p.name != S.POINTER and not p.name.startswith("."):
                try:
                    os.link(p, tmp / p.name)
                except OSError:  # a filesystem without hard links: a copy
                    shutil.copy2(p, tmp / p.name)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _same_files(held: Path, folder: Path) -> bool:
    mine = {p.name for p in folder.iterdir() if p.is_file() and p.name != S.POINTER and not p.name.startswith(".")}
    if mine != {p.name for p in held.iterdir()}:
        return False
    for n in mine:
        a, b = os.stat(held / n), os.stat(folder / n)
        if (a.st_ino, a.st_dev) != (b.st_ino, b.st_dev) and (a.st_size, a.st_mtime_ns) != (b.st_size, b.st_mtime_ns):
            return False
    return True


def forget(output_dir: str | Path, name: str) -> dict[str, list[str]]:
    """Trainer is about to write checkpoint ``name`` again (a run resumed from an earlier checkpoint):
    re-code whatever depends on the old ``name`` (see :func:`~tpde_hf.checkpoints.api.collect`), then drop
    its entry, its hold and its folder's pointer, so the new files are not mistaken for the old ones."""
    from tpde_hf.checkpoints import api

    output_dir = Path(output_dir)
    root = output_dir / S.STORE_DIRNAME
    if not (S.entry_path(root, name).exists() or S.raw_path(root, name).is_dir()):
        return {"rebased": [], "deleted": []}
    res = api.collect(output_dir, dead={name})
    (output_dir / name / S.POINTER).unlink(missing_ok=True)
    return res


def holds(root: Path) -> list[str]:
    """Names of the checkpoints the store holds as plain files, oldest step first."""
    found = [p.name[: -len(S.RAW_SUFFIX)] for p in Path(root).glob(f"*{S.RAW_SUFFIX}") if p.is_dir()
             and not p.name.startswith(".")]
    return sorted(found, key=lambda n: (step_of(n) is None, step_of(n) or 0, n))


def _children(mans: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, man in mans.items():
        if man.get("parent") is not None:
            out.setdefault(man["parent"], []).append(name)
    return out


def older_run(mans: dict[str, dict[str, Any]], name: str) -> int:
    """The longest run of backward deltas that ends in ``name`` (entries coded against it, and so on)."""
    kids = _children(mans)
    best, todo, seen = 0, [(name, 0)], set()
    while todo:
        cur, n = todo.pop()
        if cur in seen:
            continue
        seen.add(cur)
        best = max(best, n)
        todo.extend((c, n + 1) for c in kids.get(cur, ()) if mans[c].get("version") == S.BACKWARD_VERSION)
    return best


def write_checked(root: Path, name: str, tensors: dict, manifest: dict, cur: S.Decoded,
                  ref: S.Decoded | None, verify: bool | str, runner: Any = None, digested: bool = False) -> Path:
    """Write an entry under a temporary name, check it, then ``os.replace`` it into place.

    The check (``verify=True``): every part's bytes on disk against the part written, each piece compared right
    after it is written while the next is written (``store.write_entry(checked=True)``, mapped with
    ``runner``), then the file's ``fsync``; the manifest read back through safetensors, every
    skeleton decompressed against ``cur``'s, and (unless ``digested``: :func:`encode_entry` did it) every file of
    ``cur`` rebuilt to its recorded hash. ``"full"``: the entry decoded from disk as a restore would.
    """
    final = S.entry_path(root, name)
    tmp = Path(root) / f".{name}.tpde.new"
    try:
        if verify == "full" or not verify:
            S.write_entry(tmp, tensors, manifest)
        if verify == "full":
            dec = S.decode_entry(tmp, ref)
            for f in manifest["files"]:
                S.file_digest(dec, f["name"])
        elif verify:
            bad = S.write_entry(tmp, tensors, manifest, checked=True, runner=runner)
            if bad is not None:
                raise TpdeFormatError(str(tmp), bad)
            if S.read_manifest(tmp) != json.loads(json.dumps(manifest)):
                raise TpdeFormatError(str(tmp), "entry manifest on disk differs from the one written")
            for i, rec in enumerate(manifest["files"]):
                blob = tensors[f"skeleton.{i}"].numpy().tobytes()
                if S.skeleton_bytes(blob, ref.skeletons if ref is not None else None, rec) \
                        != cur.skeletons[rec["name"]]:
                    raise TpdeFormatError(str(tmp), f"skeleton of {rec['name']} does not decompress to the original")
                if not digested:
                    S.file_digest(cur, rec["name"])
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def big_files(manifest: dict[str, Any]) -> list[str]:
    return [f["name"] for f in manifest["files"] if f["ranges"] or f["size"] >= _KEEP_SMALL]


def _call(job: tuple) -> dict:
    return job[1](job[2])


def encode_entry(cur: S.Decoded, parent: S.Decoded | None, *, step: int | None, depth: int,
                 param_names: Sequence[str] | None, verify: bool, runner: Any = None) -> tuple[dict, dict]:
    """:func:`tpde_hf.checkpoints.store.encode_entry` for a backward entry (the same tensors and manifest), with
    every tensor in one job list, largest first, with the skeletons' compression and (``verify``) the check that
    every file of ``cur`` rebuilds to its recorded hash.

    The decoder needs the tensors of earlier :func:`~tpde_hf.checkpoints.predict.stages` before a tensor's
    features; the encoder has all of ``cur`` from the start, so it gives each tensor exactly the tensors of
    the earlier stages (what the decoder will have) and needs no barrier between stages: the two threads of a
    wait finish together. ``runner(fn, items)``: a map (an :class:`~tpde_hf.checkpoints.assist.Assist`, whose
    ``fork`` also lets idle threads take runs of a large tensor's chunks); default: in order on this thread.
    """
    codec = TENSOR_CODECS.get(S.CODEC)
    prev = parent.tensors if parent is not None else None
    stages = predict.stages(list(cur.tensors))
    seen: dict[str, dict] = {}
    earlier: dict = {}
    for stage in stages:
        for k in stage:
            seen[k] = earlier  # the tensors of the earlier stages (shared by every tensor of this stage)
        earlier = {**earlier, **{k: cur.tensors[k] for k in stage}}
    fork = getattr(runner, "fork", None)

    def one(key: str) -> dict:
        with enc_buffers.scratch():  # the features, contexts and prediction in reused buffers (no page faults)
            opts = predict.options(key, seen[key], prev, param_names, backward=True, lazy=True)
            if verify:
                opts["verify"] = True
            if fork is not None:
                opts["fork"] = fork
            ref = prev.get(key) if prev is not None else None
            return stored_parts(key, S.CODEC, codec.encode(cur.tensors[key], CodecContext(key, ref, opts)))

    def skeleton(i: int) -> dict:
        name = cur.manifest["files"][i]["name"]
        blob = S.compress_skeleton(cur.skeletons[name], parent.skeletons if parent is not None else None, name)
        return {f"skeleton.{i}": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}

    def digest(name: str) -> dict:
        S.file_digest(cur, name)  # the file rebuilds from its skeleton and tensors to its recorded hash
        return {}

    # longest first, so that both threads of a wait end together (a file's hash weighs about a tenth of coding)
    jobs = [(cur.tensors[k].numel(), one, k) for k in cur.tensors]
    jobs += [(len(cur.skeletons[f["name"]]) // 8, skeleton, i) for i, f in enumerate(cur.manifest["files"])]
    if verify:
        jobs += [(int(f["size"]) // 40, digest, f["name"]) for f in cur.manifest["files"]]
    jobs.sort(key=lambda j: -j[0])
    out: dict = {}
    for parts in (runner(_call, jobs) if runner is not None else map(_call, jobs)):
        out.update(parts)
    return out, S.entry_manifest(cur, parent, step=step, depth=depth, param_names=param_names, backward=True)


def pack_older(root: Path, name: str, ref: S.Decoded, *, keyframe_every: int, cur: S.Decoded | None = None,
               param_names: Sequence[str] | None = None, verify: bool | str = True, runner: Any = None) -> dict:
    """Re-code held checkpoint ``name`` against the later ``ref`` (or alone: a keyframe), then release
    its plain files (pointer, delete, drop the hold). Returns a summary and ``cur`` (the decoded ``name``)."""
    root = Path(root)
    mans = dict(S.entries(root))
    if cur is None or cur.name != name:
        src = S.raw_source(root, name)
        if src is None:
            raise TpdeFormatError(str(S.raw_path(root, name)), "no plain files to pack")
        cur = S.read_checkpoint(src, name=name, runner=runner)
    keyframe = older_run(mans, name) + 1 >= keyframe_every
    parent = None if keyframe else ref
    try:
        tensors, manifest = encode_entry(cur, parent, step=step_of(name), depth=0 if keyframe else 1,
                                         param_names=param_names, verify=bool(verify), runner=runner)
    finally:
        # the coding's reused buffers go back before the entry is written: the page cache takes their freed
        # pages (on this VM a page never freed costs several times more to hand out; measured: writing took 2x)
        enc_buffers.release_scratch()
    entry = write_checked(root, name, tensors, manifest, cur, parent, verify, runner=runner, digested=True)
    del tensors
    stored = entry.stat().st_size
    release(root, name, manifest)
    return {"name": name, "entry": entry, "parent": manifest["parent"], "stored": stored,
            "raw": sum(f["size"] for f in manifest["files"]), "cur": cur}


def release(root: Path, name: str, manifest: dict[str, Any]) -> None:
    """After ``name``'s entry is in place: point its folder at the entry, delete the large files, drop the hold."""
    folder = Path(root).parent / name
    if folder.is_dir() and not (folder / S.POINTER).exists():
        st = os.stat(folder)
        big = big_files(manifest)
        ptr = {"format": S.FORMAT, "entry": str(Path("..") / S.STORE_DIRNAME / f"{name}.tpde"), "removed": big}
        S.atomic_write(folder / S.POINTER, json.dumps(ptr, indent=1).encode())
        for f in big:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(folder / f)
        os.utime(folder, ns=(st.st_atime_ns, st.st_mtime_ns))  # Trainer's rotation may sort by mtime
    shutil.rmtree(S.raw_path(root, name), ignore_errors=True)


def advance(head_dir: str | Path, *, keyframe_every: int, param_names: Sequence[str] | None = None,
            cache: S.Decoded | None = None, verify: bool | str = True, runner: Any = None,
            gate: Any = None) -> tuple[list[dict], S.Decoded]:
    """Checkpoint ``head_dir`` was just written: hold it, and pack every older held checkpoint against the
    next later one (normally just the previous checkpoint). ``cache``: the previous head, decoded (what the
    last call returned). ``gate()``: called after the head is held and read, before any packing.
    Returns the packs' summaries and the decoded head (the next call's cache).

    An older held checkpoint whose folder is gone and that no entry depends on is dropped unpacked.
    """
    head_dir = Path(head_dir).resolve()
    root = head_dir.parent / S.STORE_DIRNAME
    root.mkdir(exist_ok=True)
    hold_raw(root, head_dir)
    # read on every thread that helps (the training thread, when it already waits for this pack)
    head = S.read_checkpoint(S.raw_path(root, head_dir.name), name=head_dir.name, runner=runner)
    hstep = step_of(head_dir.name)
    older = [n for n in holds(root) if n != head_dir.name and (hstep is None or (step_of(n) or 0) < hstep)]
    if gate is not None and older:
        gate()  # e.g. until the training thread waits for this pack (the callback's ``defer``)
    done, ref = [], head
    for name in reversed(older):  # newest first: each is coded against the next later one
        mans = dict(S.entries(root))
        if name in mans:  # a crash after its entry was written: finish the release
            S.read_manifest(S.entry_path(root, name))
            release(root, name, mans[name])
            ref = S.decode_chain(root, name)
            continue
        if not (head_dir.parent / name).is_dir() and not _children(mans).get(name):
            shutil.rmtree(S.raw_path(root, name), ignore_errors=True)  # rotated away, nothing needs it
            continue
        res = pack_older(root, name, ref, keyframe_every=keyframe_every,
                         cur=cache if cache is not None and cache.name == name else None,
                         param_names=param_names, verify=verify, runner=runner)
        ref = res.pop("cur")
        done.append(res)
    return done, head
