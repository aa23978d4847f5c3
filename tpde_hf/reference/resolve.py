"""Find the reference (base) model of a delta repo and read its tensors, checked against stored checksums.

A reference is a Hub repo id (``org/name``, optionally ``@revision``) or a local folder. Hub references are
fetched through huggingface_hub's cache (``snapshot_download``): one copy serves every fine-tune of that base,
``HF_HUB_OFFLINE=1`` / ``local_files_only`` use the cache only, and ``token`` is passed through. A conversion
records the commit the revision resolved to; a load asks for exactly that commit.

The reference may be a dense repo or a tpde repo (its tpde weights are decoded, bit-exact).

Example::

    ref = resolve_reference("HuggingFaceTB/SmolLM2-135M@main")
    ref.commit                    # '12ab...' (40 hex digits)
    w = ref.reader().get("model.embed_tokens.weight")
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tpde_hf.errors import TpdeFormatError
from tpde_hf.integrity import digest_of

_REPO_ID = re.compile(r"^[\w.\-]{1,96}/[\w.\-]{1,96}$")
_PATTERNS = ["*.safetensors", "*.json"]


class ReferenceError(TpdeFormatError):
    """The reference model is missing, unreachable, or not the one the repo was coded against."""


@dataclass
class ResolvedReference:
    """A reference model on this machine: ``folder`` holds its config and safetensors files."""

    spec: str
    folder: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    _reader: Any = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """How errors name it: ``org/name@commit`` or the local path."""
        if self.repo_id:
            return f"{self.repo_id}@{self.commit or self.revision or 'main'}"
        return str(self.folder)

    def reader(self) -> ReferenceReader:
        if self._reader is None:
            self._reader = ReferenceReader(self.folder, self.label)
        return self._reader


def split_spec(spec: str, revision: str | None = None) -> tuple[str, str | None]:
    """``'org/name@rev'`` -> ``('org/name', 'rev')``; a local path with ``@`` in it is taken as it is."""
    spec = os.fspath(spec)
    if revision is None and "@" in spec and not Path(spec).exists():
        spec, _, revision = spec.rpartition("@")
    return spec, revision or None


def resolve_reference(spec: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None,
                      local_files_only: bool | None = None, cache_dir: str | os.PathLike | None = None,
                      endpoint: str | None = None) -> ResolvedReference:
    """The reference ``spec`` (a local folder, or a Hub id with optional ``@revision``) on this machine.

    Raises :class:`ReferenceError` naming the reference when it is missing or unreachable.
    """
    name, revision = split_spec(os.fspath(spec), revision)
    path = Path(name).expanduser()
    if path.is_dir():
        return ResolvedReference(name, path.resolve())
    if not _REPO_ID.match(name):
        raise ReferenceError(name, "reference model not found: no such folder, and not a Hub repo id (org/name)")
    from huggingface_hub import constants, snapshot_download

    offline = bool(local_files_only) or constants.HF_HUB_OFFLINE
    try:
        folder = Path(snapshot_download(name, revision=revision, token=token, cache_dir=cache_dir,
                                        allow_patterns=_PATTERNS, local_files_only=offline, endpoint=endpoint))
    except Exception as exc:  # huggingface_hub raises many kinds; all mean "cannot get it"
        where = f"{name}@{revision or 'main'}"
        how = ("it is not in the local cache and offline mode is on (HF_HUB_OFFLINE / local_files_only): download "
               f"it once online (`hf download {name}" + (f" --revision {revision}" if revision else "") + "`)"
               if offline else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        raise ReferenceError(where, f"cannot get the reference model: {how}") from None
    commit = folder.name if re.fullmatch(r"[0-9a-f]{40}", folder.name) else None
    return ResolvedReference(f"{name}@{revision}" if revision else name, folder, name, revision, commit)


def tensor_digest(t: torch.Tensor) -> str:
    """xxh3-64 (16 hex digits) of a tensor's dtype, shape and bytes, as :mod:`tpde_hf.integrity` hashes them."""
    from tpde_hf.format import SAFETENSORS_DTYPES

    st = {v: k for k, v in SAFETENSORS_DTYPES.items()}[str(t.dtype).replace("torch.", "")]
    data = t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy()
    return digest_of(st, tuple(t.shape), [memoryview(data)])


class ReferenceReader:
    """Tensors of a reference folder by name: dense safetensors (memory-mapped) or a tpde repo (decoded)."""

    def __init__(self, folder: Path, label: str):
        from safetensors import safe_open

        from tpde_hf.integrity import repo_weight_files

        self.label = label
        files = [f for f in repo_weight_files(folder) if f.is_file()]
        if not files:
            raise ReferenceError(label, f"the reference model has no safetensors weights in {folder}")
        self._where: dict[str, Any] = {}
        self._files: dict[int, Path] = {}
        self._handles = []
        for f in files:
            try:
                fh = safe_open(str(f), framework="pt")
            except Exception as exc:
                raise ReferenceError(label, f"cannot read reference weights {f.name}: {exc}") from None
            self._handles.append(fh)
            self._files[id(fh)] = f
            for k in fh.keys():
                self._where[k] = fh
        config = folder / "config.json"
        qc = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
        self.is_tpde = isinstance(qc, dict) and qc.get("quant_method") == "tpde"
        self._storage: dict[str, Any] = {}
        self._dense_names = self._names()

    def _names(self) -> dict[str, tuple[str, ...] | None]:
        """Every dense tensor name of the reference -> its shape (None: known only once decoded)."""
        from tpde_hf.format import encoded_prefixes, parse_expert_slice

        keys = list(self._where)
        if not self.is_tpde:
            return {k: None for k in keys}
        from tpde_hf.codec import SUFFIXES
        from tpde_hf.codec.registry import group_coded_keys
        from tpde_hf.reference import CODEC_NAMES

        if any(g.codec in CODEC_NAMES for g in group_coded_keys(keys).values()):
            raise ReferenceError(self.label, "the reference is itself a delta repo (coded against another "
                                             "reference); use its dense or tpde base instead")
        prefixes = encoded_prefixes(keys)
        parts = {f"{p}.{s}" for p in prefixes for s in SUFFIXES}
        self._storage = _storage_weights(keys)  # weights laid out by a base storage (tpde convert --storage)
        parts |= {k for w in self._storage.values() for k in w.parts.values()}
        out: dict[str, tuple[str, ...] | None] = {k: None for k in keys if k not in parts}
        out.update({w.name: None for w in self._storage.values()})
        for p in prefixes:
            parsed = parse_expert_slice(p)
            out[parsed[0] if parsed else f"{p}.weight"] = None
        return out

    def names(self) -> list[str]:
        return sorted(self._dense_names)

    def __contains__(self, name: str) -> bool:
        return name in self._dense_names

    def get(self, name: str) -> torch.Tensor:
        """The reference tensor ``name``, dense and bit-exact; :class:`ReferenceError` if it has none."""
        if name not in self._dense_names:
            raise ReferenceError(self.label, f"the reference model has no tensor {name!r}")
        if name in self._where:
            mapped = self._mapped_view(name)
            return mapped if mapped is not None else self._where[name].get_tensor(name)
        from tpde_hf.codec import decode_tensors
        from tpde_hf.format import decode_expert_tensor, module_prefix, read_encoded

        read = self._read
        prefix = module_prefix(name) if name.endswith(".weight") else None
        if prefix is not None and prefix in self._storage:
            from tpde_hf.storage_format import decode_weight

            w = self._storage[prefix]
            return decode_weight(name, w.storage, {p: read(k) for p, k in w.parts.items()}, verify=True)
        if prefix is not None and f"{prefix}.meta" in self._where:
            from tpde_hf.codec import SUFFIXES

            enc = read_encoded({f"{prefix}.{s}": read(f"{prefix}.{s}") for s in SUFFIXES}, prefix)
            return decode_tensors([enc], verify=True)[0]
        n = 1 + max(int(k.split(".tpde_expert")[1].split(".")[1]) for k in self._where
                    if k.startswith(name + ".tpde_expert"))
        return decode_expert_tensor(name, n, read, self._where.keys())

    def _mapped_view(self, name: str) -> torch.Tensor | None:
        """Tensor ``name`` as a view of its file, memory-mapped copy-on-write (no copy, no read until used: the
        decode touches it without the GIL); None when it cannot be one (then it is read as usual)."""
        fh = self._where[name]
        maps = self.__dict__.setdefault("_maps", {})
        if id(fh) not in maps:
            from tpde_hf.integrity import MappedShard

            try:
                maps[id(fh)] = MappedShard(self._files[id(fh)])
            except (OSError, ValueError):  # TpdeFormatError too: safetensors reads (and reports) the file
                maps[id(fh)] = None
        shard = maps[id(fh)]
        return shard.view(name) if shard is not None else None

    def _read(self, key: str) -> torch.Tensor:
        return self._where[key].get_tensor(key)


def _storage_weights(keys: list[str]) -> dict[str, Any]:
    """Weights laid out by a base storage, by prefix ({} when this tpde-hf has no storage formats)."""
    try:
        from tpde_hf.storage_format import storage_weights
    except ImportError:
        return {}
    return storage_weights(keys)


def check_reference_tensor(ref: ResolvedReference, name: str, expected: str,
                           read_lock: threading.Lock | None = None) -> torch.Tensor:
    """The reference tensor ``name``, after checking it against the checksum recorded at conversion.

    ``read_lock``: held while the tensor is read (one reader of the reference's safetensors handles at a time);
    the hash runs outside it, so that several threads hash at once.
    """
    with read_lock if read_lock is not None else contextlib.nullcontext():
        t = ref.reader().get(name)
    got = tensor_digest(t)
    if got != expected:
        raise ReferenceError(ref.label, f"reference tensor {name!r} differs from the one this repo was coded "
                                        f"against (xxh3 {got}, expected {expected}): wrong or modified reference model")
    return t


class LoadReference:
    """The reference of one load: resolved on first use, each tensor checked once against its checksum."""

    def __init__(self, info: dict, token: Any = None, cache_dir: Any = None, local_files_only: bool | None = None):
        if not isinstance(info.get("model"), str) or not isinstance(info.get("tensors"), list):
            raise TpdeFormatError("config.json", "quantization_config.reference is malformed (needs 'model' and "
                                                 "'tensors')")
        self.info = info
        self.token = token
        self.cache_dir = cache_dir
        self.local_files_only = local_files_only
        self._ref: ResolvedReference | None = None
        self._lock = threading.Lock()
        self._read_lock = threading.Lock()  # one reader of the reference's safetensors handles at a time

    @property
    def label(self) -> str:
        i = self.info
        return f"{i['model']}@{i['commit']}" if i.get("commit") else i["model"]

    def resolved(self) -> ResolvedReference:
        with self._lock:
            if self._ref is None:
                i = self.info
                # a Hub reference is fetched at the recorded commit: the bytes it was coded against
                self._ref = resolve_reference(i["model"], revision=i.get("commit") or i.get("revision"),
                                              token=self.token, cache_dir=self.cache_dir,
                                              local_files_only=self.local_files_only)
            return self._ref

    def resolve_cached(self) -> bool:
        """Resolve the reference from this machine alone: True when it is a local folder, or a Hub repo at its
        recorded commit whose snapshot in the Hugging Face cache holds every weight file; False when resolving it
        would need the network (a download, a branch to look up) or fails. Never downloads, never asks the Hub.

        Used by the early start (:mod:`tpde_hf.reference.early`), which must not download anything: the load's own
        resolution (:meth:`resolved`, with its download arguments) is then the one that fetches a missing reference.
        A commit-pinned snapshot's files are the bytes an online resolution returns, so the decode is the same.
        """
        i = self.info
        revision = i.get("commit") or i.get("revision")
        name, revision = split_spec(os.fspath(i["model"]), revision)
        local = Path(name).expanduser().is_dir()
        if not local and not (isinstance(revision, str) and re.fullmatch(r"[0-9a-f]{40}", revision)):
            return False  # a branch or tag: only the Hub knows its current commit
        try:
            ref = resolve_reference(i["model"], revision=i.get("commit") or i.get("revision"), token=self.token,
                                    cache_dir=self.cache_dir, local_files_only=True)
            from tpde_hf.integrity import repo_weight_files

            files = repo_weight_files(ref.folder)
        except Exception:  # not cached, unreadable index, ...: the load's own resolution reports it
            return False
        if not files or not all(f.is_file() for f in files):
            return False  # a partial snapshot: an online resolution would download the rest
        with self._lock:
            if self._ref is None:
                self._ref = ref
        return True

    def _entry(self, index: int, key: str) -> tuple[str, str]:
        tensors = self.info["tensors"]
        if not 0 <= index < len(tensors) or not isinstance(tensors[index], list) or len(tensors[index]) != 2:
            raise TpdeFormatError(key, f"names reference tensor #{index}, which config.json does not list")
        return tensors[index][0], tensors[index][1]

    def tensor(self, index: int, key: str) -> torch.Tensor:
        """Reference tensor ``index`` (of ``quantization_config.reference.tensors``), checked against its xxh3."""
        name, digest = self._entry(index, key)
        return check_reference_tensor(self.resolved(), name, digest, self._read_lock)

    def unchecked(self, index: int, key: str) -> torch.Tensor:
        """Reference tensor ``index`` *without* its xxh3 check: only for a decode whose result is checked, where a
        failure calls :meth:`tensor` to name a wrong reference (the result's own xxh3 covers every reference byte
        it was rebuilt from, so the check adds nothing on success; it held the GIL ~0.04-0.13 CPU-s per load)."""
        name, _ = self._entry(index, key)
        ref = self.resolved()
        with self._read_lock:
            return ref.reader().get(name)
