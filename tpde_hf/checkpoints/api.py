"""The plain API: pack a checkpoint folder as a delta, restore it, keep the chains whole.

Works on any folder of checkpoint files (``model.safetensors``, ``optimizer.pt`` from
``torch.save(optimizer.state_dict())``, anything else); :class:`~tpde_hf.checkpoints.callback.TpdeCheckpointCallback`
calls it for Trainer's folders.

Example (a custom loop)::

    from tpde_hf.checkpoints import pack, restore
    save_file(model.state_dict(), f"run/checkpoint-{step}/model.safetensors")
    torch.save(opt.state_dict(), f"run/checkpoint-{step}/optimizer.pt")
    pack(f"run/checkpoint-{step}", param_names=[n for n, _ in model.named_parameters()])
    ...
    restore("run/checkpoint-200")         # the original files are back, byte for byte
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tpde_hf.checkpoints import store as S
from tpde_hf.checkpoints.chain import restore_files
from tpde_hf.errors import TpdeFormatError

DEFAULT_KEYFRAME_EVERY = 8


@dataclass
class PackResult:
    """What :func:`pack` stored: the entry, its parent (None: a keyframe), raw and stored bytes."""

    name: str
    entry: Path
    parent: str | None
    raw_bytes: int
    stored_bytes: int
    decoded: S.Decoded | None = None


def store_root(ckpt_dir: str | Path) -> Path:
    return Path(ckpt_dir).resolve().parent / S.STORE_DIRNAME


def _step(name: str) -> int | None:
    m = re.search(r"(\d+)$", name)
    return int(m.group(1)) if m else None


def read_pointer(ckpt_dir: str | Path) -> dict[str, Any] | None:
    """The pointer of a packed checkpoint folder, or None if the folder is not packed."""
    p = Path(ckpt_dir) / S.POINTER
    if not p.exists():
        return None
    try:
        ptr = json.loads(p.read_text())
        if ptr.get("format") != S.FORMAT or not isinstance(ptr.get("entry"), str):
            raise ValueError("not a tpde checkpoint pointer")
    except ValueError as exc:
        raise TpdeFormatError(str(p), f"corrupt pointer file ({exc})") from None
    return ptr


def is_packed(ckpt_dir: str | Path) -> bool:
    return read_pointer(ckpt_dir) is not None


def pack(ckpt_dir: str | Path, *, parent: str | None | bool = True, param_names: Sequence[str] | None = None,
         keyframe_every: int = DEFAULT_KEYFRAME_EVERY, cache: S.Decoded | None = None, verify: bool | str = True,
         keep_decoded: bool = False, runner: Any = None) -> PackResult:
    """Store ``ckpt_dir`` as an entry of the store beside it and remove its large files.

    ``parent=True`` picks the newest entry of an earlier step (a keyframe once its chain has
    ``keyframe_every`` entries); a name picks that entry; None makes a keyframe. ``cache`` is the
    decoded parent if the caller holds it (the callback does), which saves decoding its chain.
    With ``verify`` (default) nothing is deleted before the entry is proven to give the files back:
    each tensor's payload is checked right after encoding (the decoder's inverse of every element's symbol
    and rANS step, and sampled chunks decoded and compared bit for bit, see ``CheckpointDelta._verify``),
    then the entry file is read back and compared with what was written, and every file's skeleton and
    tensor ranges are hashed against the original file's hash. ``verify="full"`` instead decodes the
    entry from disk exactly as :func:`restore` does (slower, same guarantee). ``runner``: see
    :func:`~tpde_hf.checkpoints.store.encode_entry`. This is the forward layout; the callback's default,
    backward deltas, is :func:`tpde_hf.checkpoints.backward.advance`.
    """
    ckpt_dir = Path(ckpt_dir)
    if read_pointer(ckpt_dir) is not None:
        raise ValueError(f"{ckpt_dir} is already packed")
    root = store_root(ckpt_dir)
    root.mkdir(exist_ok=True)
    step = _step(ckpt_dir.name)
    if parent is True:
        parent = _pick_parent(root, step, keyframe_every, live_entries(ckpt_dir.resolve().parent))
    prev = S.decode_chain(root, parent, cache) if parent else None
    depth = (S.read_manifest(S.entry_path(root, parent))["depth"] + 1) if parent else 0
    cur = S.read_checkpoint(ckpt_dir)
    tensors, manifest = S.encode_entry(cur, prev, step=step, depth=depth, param_names=param_names,
                                       verify=bool(verify), runner=runner)
    entry = S.entry_path(root, ckpt_dir.name)
    S.write_entry(entry, tensors, manifest)
    big = [f["name"] for f in manifest["files"] if f["ranges"] or f["size"] >= S.KEEP_FILE]
    # Everything below raises before anything is deleted.
    if verify == "full":  # the restore path itself: decode the entry from disk, rebuild every file
        decoded = S.decode_entry(entry, prev)
        for name in big:
            S.file_digest(decoded, name)
    elif verify:  # each payload was checked in encode_entry; now the bytes on disk and the files
        S.check_entry(entry, tensors, manifest, cur, prev)
    del tensors
    ptr = {"format": S.FORMAT, "entry": str(Path("..") / S.STORE_DIRNAME / entry.name), "removed": big}
    S.atomic_write(ckpt_dir / S.POINTER, json.dumps(ptr, indent=1).encode())
    raw = sum(f["size"] for f in manifest["files"])
    for name in big:
        (ckpt_dir / name).unlink(missing_ok=True)
    return PackResult(ckpt_dir.name, entry, parent or None, raw, entry.stat().st_size,
                      cur if keep_decoded else None)


def _pick_parent(root: Path, step: int | None, keyframe_every: int, live: set[str]) -> str | None:
    best = None
    for name, man in S.entries(root):
        if name not in live:
            continue
        if step is not None and man.get("step") is not None and man["step"] >= step:
            continue
        best = (name, man)
    if best is None or best[1].get("depth", 0) + 1 >= keyframe_every:
        return None
    return best[0]


def _entry_of(ckpt_dir: Path) -> tuple[Path, str, dict[str, Any]]:
    ptr = read_pointer(ckpt_dir)
    if ptr is None:
        raise ValueError(f"{ckpt_dir} is not a tpde-packed checkpoint (no {S.POINTER})")
    entry = (ckpt_dir / ptr["entry"]).resolve()
    return entry.parent, entry.name[: -len(".tpde")], ptr


def restore(ckpt_dir: str | Path, out: str | Path | None = None, files: Sequence[str] | None = None) -> list[Path]:
    """Write back the files of a packed checkpoint, byte for byte (each checked against its hash).

    A folder that is not packed (the newest checkpoint with backward deltas) is already plain: nothing
    to do (with ``out``, a copy). With ``out`` None the files return into ``ckpt_dir`` itself (what ``trainer.train(
    resume_from_checkpoint=ckpt_dir)`` then reads); else ``out`` receives a full plain copy.
    ``files`` restricts it to those file names (e.g. only the weights). Returns the files written.
    Files are written under temporary names and moved into place.
    """
    ckpt_dir = Path(ckpt_dir)
    if read_pointer(ckpt_dir) is None and ckpt_dir.is_dir():  # plain (the newest, with backward deltas)
        return _copy_plain(ckpt_dir, out, files)
    root, name, ptr = _entry_of(ckpt_dir)
    paths, raw = S.links(root, name)
    man = S.read_manifest(paths[-1]) if paths else None
    if man is None:  # the entry's own plain files are still held (a crash before the hold was dropped)
        dec = S.decode_chain(root, name)
        man = dec.manifest
    target = Path(out) if out is not None else ckpt_dir
    names = ptr["removed"] if out is None else [f["name"] for f in man["files"]]
    if files is not None:
        known = {f["name"] for f in man["files"]}
        missing = sorted(set(files) - known)
        if missing:
            raise ValueError(f"{ckpt_dir}: no file(s) {missing} in the packed checkpoint")
        names = [n for n in names if n in set(files)]
    target.mkdir(parents=True, exist_ok=True)
    if paths:  # decode the chain as one job graph, each file written as soon as its tensors are there
        start = S.read_checkpoint(raw, name=S.raw_name(root, raw), hash_files=False) if raw is not None else None
        restore_files(paths, start, {fname: target / fname for fname in names})
        return [target / fname for fname in names]
    # one thread per file: each write is a copy into the page cache and an fsync, which overlap
    with ThreadPoolExecutor(max(1, min(len(names), 4))) as pool:
        for job in [pool.submit(S.write_file, dec, fname, target / fname) for fname in names]:
            job.result()
    return [target / fname for fname in names]


def _copy_plain(ckpt_dir: Path, out: str | Path | None, files: Sequence[str] | None) -> list[Path]:
    """:func:`restore` of a folder that is not packed: its files are already there (a copy with ``out``)."""
    names = [p.name for p in sorted(ckpt_dir.iterdir()) if p.is_file() and p.name != S.POINTER]
    if files is not None:
        missing = sorted(set(files) - set(names))
        if missing:
            raise ValueError(f"{ckpt_dir}: no file(s) {missing} in the checkpoint")
        names = [n for n in names if n in set(files)]
    if out is None:
        return []
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    for n in names:
        shutil.copyfile(ckpt_dir / n, target / n)
    return [target / n for n in names]


def compact(ckpt_dir: str | Path) -> list[str]:
    """Delete restored files of a packed checkpoint again (only those whose bytes match the entry's hash)."""
    ckpt_dir = Path(ckpt_dir)
    root, name, ptr = _entry_of(ckpt_dir)
    recs = {f["name"]: f for f in S.read_manifest(S.entry_path(root, name))["files"]}
    gone = []
    for fname in ptr["removed"]:
        p = ckpt_dir / fname
        if p.exists() and fname in recs and p.stat().st_size == recs[fname]["size"] \
                and S.file_hash(p.read_bytes()) == recs[fname]["xxh3"]:
            p.unlink()
            gone.append(fname)
    return gone


def live_entries(output_dir: str | Path) -> set[str]:
    """Names of the entries that some checkpoint folder of ``output_dir`` still points to."""
    live = set()
    for d in Path(output_dir).iterdir():
        if d.is_dir() and (d / S.POINTER).exists():
            try:
                live.add(_entry_of(d)[1])
            except (TpdeFormatError, ValueError):
                continue
    return live


def collect(output_dir: str | Path, dead: set[str] | frozenset[str] = frozenset()) -> dict[str, list[str]]:
    """Delete the entries and held folders no checkpoint needs any more, rebasing first so no chain breaks.

    A checkpoint is dead when its folder is gone (Trainer's ``save_total_limit`` rotation, or its final
    clean-up with ``load_best_model_at_end``). A live entry whose parent is dead is re-coded before
    anything is deleted: a backward entry against the first live checkpoint along its old chain (a
    keyframe if there is none), a forward one as a keyframe. The new entry is written under a
    temporary name and checked; the old one stays until ``os.replace``. Then every dead entry and held
    folder that no live chain passes through is removed (with backward deltas, the oldest checkpoint:
    nothing depends on it). ``dead``: names to treat as gone although their folders exist (see
    :func:`tpde_hf.checkpoints.backward.forget`).
    """
    from tpde_hf.checkpoints import backward as B

    output_dir = Path(output_dir)
    root = output_dir / S.STORE_DIRNAME
    if not root.exists():
        return {"rebased": [], "deleted": []}
    live = {d.name for d in output_dir.glob("checkpoint-*") if d.is_dir()} - set(dead)
    mans = dict(S.entries(root))
    held = B.holds(root)
    rebased = []
    for name in sorted(live & set(mans), key=lambda n: mans[n].get("step") or 0):
        par = mans[name].get("parent")
        if par is None or par in live:
            continue
        backward = mans[name].get("version") == S.BACKWARD_VERSION
        new = None
        if backward:  # the first live checkpoint along the old chain (chains only get shorter)
            new, seen = par, set()
            while new is not None and new not in live and new not in seen:
                seen.add(new)
                new = mans[new].get("parent") if new in mans and not S.raw_path(root, new).is_dir() else None
        dec = S.decode_chain(root, name)
        ref = S.decode_chain(root, new) if new is not None else None
        tensors, manifest = S.encode_entry(dec, ref, step=mans[name].get("step"), depth=1 if ref is not None else 0,
                                           param_names=mans[name].get("param_names"), verify=True, backward=backward)
        B.write_checked(root, name, tensors, manifest, dec, ref, True)
        mans[name] = manifest
        rebased.append(name)
    needed: set[str] = set()
    for name in live & (set(mans) | set(held)):
        cur: str | None = name
        while cur is not None and cur not in needed:
            needed.add(cur)
            cur = None if S.raw_path(root, cur).is_dir() else mans.get(cur, {}).get("parent")
    deleted = []
    for name in mans:
        if name not in needed:
            S.entry_path(root, name).unlink(missing_ok=True)
            deleted.append(name)
    for tmp in [*root.glob(".*.tpde.new"), *root.glob(".*.rawtmp")]:  # left by a crash mid-write
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    for name in held:
        if name not in needed or (name in mans and name not in live):
            shutil.rmtree(S.raw_path(root, name), ignore_errors=True)
            if name not in mans:
                deleted.append(name)
    return {"rebased": rebased, "deleted": deleted}


def pack_all(output_dir: str | Path, *, backward: bool = False, **kw: Any) -> list[PackResult]:
    """Pack every unpacked ``checkpoint-N`` folder of ``output_dir``, oldest first.

    ``backward``: the newest stays plain (held in the store) and every older one becomes a delta against
    the next later one (see :mod:`~tpde_hf.checkpoints.backward`); ``kw``: ``param_names``,
    ``keyframe_every``, ``verify``.
    """
    dirs = sorted((d for d in Path(output_dir).glob("checkpoint-*") if d.is_dir() and not is_packed(d)),
                  key=lambda d: _step(d.name) or 0)
    if not backward:
        return [pack(d, **kw) for d in dirs]
    from tpde_hf.checkpoints import backward as B

    out, cache = [], None
    for d in dirs:  # each save in turn, as the callback does it
        done, cache = B.advance(d, cache=cache, keyframe_every=kw.get("keyframe_every", DEFAULT_KEYFRAME_EVERY),
                                param_names=kw.get("param_names"), verify=kw.get("verify", True))
        out += [PackResult(r["name"], r["entry"], r["parent"], r["raw"], r["stored"]) for r in done]
    return out


def remove_store(output_dir: str | Path) -> None:
    shutil.rmtree(Path(output_dir) / S.STORE_DIRNAME, ignore_errors=True)
