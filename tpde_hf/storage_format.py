"""Converted weights laid out on disk by a base storage (:data:`tpde_hf.codec.registry.BASE_STORAGE`).

By default a converted weight ``X`` is stored as its seven resident tensors (``X.qweight`` ...
``X.meta``, :mod:`tpde_hf.codec.encoded`). A repo converted with ``storage=S`` (``tpde convert
--storage S``) stores instead, for each converted weight::

    X.tpde_storage.S.meta        the resident meta (int64): dtype, shape, group size, delta code, checksum
    X.tpde_storage.S.base_*      what the storage needs to rebuild the 4-bit base (qweight, scales, zeros)
    X.tpde_storage.S.<other>     what it needs, with the base parts, to rebuild the exact weight

and the loader rebuilds what each mode holds:

* ``base``: :func:`decode_base`, from the ``meta`` and ``base_*`` parts only (the delta is never read);
* ``dequantize``: :func:`decode_weight`, the exact weight straight from the storage;
* ``lossless`` / ``lossless-offload``: :func:`resident_parts`, the exact weight re-encoded with the
  meta's codec parameters into today's resident layout. The re-encode computes the checksum, so a
  wrong decode never loads: it is compared with the meta's.

A storage sees the meta through its :class:`~tpde_hf.codec.registry.CodecContext`: ``options`` holds
``shape``, ``dtype``, ``group_size``, ``params`` (the :class:`~tpde_hf.codec.CodecParams`),
``checksum`` and ``meta`` (the tensor); at encode also ``encoded``, the writer's
:class:`~tpde_hf.codec.EncodedTensor` of the weight (its resident delta, computed once), or None for a
storage that declares ``reads_resident_delta = False`` (:func:`reads_resident_delta`): the writer then
skips that encode. A storage whose parts describe themselves may ignore them.
The built-in ``resident`` storage (:mod:`tpde_hf.codec.storage_resident`) stores the seven
resident tensors under storage keys.

Example::

    parts = stored_parts(enc, weight, "model.layers.0.mlp.up_proj")   # enc.params.storage names the storage
    w = decode_weight("up.weight", "coded", {k.rsplit(".", 1)[1]: t for k, t in parts.items()})
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from tpde_hf.codec import EncodedTensor, encode_tensor, tensor_checksum
from tpde_hf.codec.encoded import StoredMeta, known_storage, parse_meta
from tpde_hf.codec.registry import BASE_STORAGE, STORAGE_TOKEN, CodecContext, group_storage_keys, storage_key
from tpde_hf.errors import TpdeFormatError

#: The part every stored weight carries beside the storage's own: the resident ``meta``.
META_PART = "meta"
BASE_PREFIX = "base_"
BASE_OUTPUTS = ("qweight", "scales", "zeros")
_PART = re.compile(r"^[A-Za-z0-9_]{1,64}$")


def is_base_part(part: str) -> bool:
    """Whether ``part`` is read in ``base`` mode (the meta and the ``base_*`` parts)."""
    return part == META_PART or part.startswith(BASE_PREFIX)


def storage_codec(name: str, tensor: str | None = None):
    """The registered base storage ``name`` (a :class:`TpdeFormatError` naming ``tensor`` if unknown)."""
    import tpde_hf.codec.storage_resident  # noqa: F401  (registers "resident")

    known_storage(name)  # imports the built-in storages on first need
    return BASE_STORAGE.get(name, tensor)


def reads_resident_delta(name: str) -> bool:
    """Whether base storage ``name`` writes from the writer's resident encode (``context.options["encoded"]``);
    see :class:`~tpde_hf.codec.registry.BaseStorage`. Example: ``reads_resident_delta("narrow-rans")`` -> False."""
    return bool(getattr(storage_codec(name), "reads_resident_delta", True))


def context_for(name: str, stored: StoredMeta, meta: torch.Tensor, **extra: object) -> CodecContext:
    """The context a storage encodes and decodes ``name`` with (see the module docstring)."""
    return CodecContext(name, None, {"shape": stored.shape, "dtype": stored.dtype, "group_size":
                                     stored.params.group_size, "params": stored.params, "checksum": stored.checksum,
                                     "meta": meta, **extra})


# ==================================================================== write
def stored_parts(enc: EncodedTensor, weight: torch.Tensor, prefix: str) -> dict[str, torch.Tensor]:
    """The tensors to write for one converted weight: its resident tensors (``enc.params.storage`` None), or
    the parts of storage ``enc.params.storage`` under :func:`registry.storage_key` plus the meta.

    ``weight`` is the original ``enc`` encodes. Example: ``stored_parts(enc, w, "layer")``.
    """
    if enc.params.storage is None:
        return enc.to_state_dict(prefix)
    base = {"qweight": enc.qweight, "scales": enc.scales, "zeros": enc.zeros}
    return storage_parts(enc.name, enc.params.storage, weight, base, enc.meta_tensor(), prefix, encoded=enc)


def storage_parts(tensor: str, storage: str, weight: torch.Tensor, base: Mapping[str, torch.Tensor],
                  meta: torch.Tensor, prefix: str, encoded: object | None) -> dict[str, torch.Tensor]:
    """:func:`stored_parts` from a weight's resident ``base`` (qweight, scales, zeros) and ``meta``, for a
    writer that holds no :class:`EncodedTensor`; ``encoded`` is what the storage sees as
    ``context.options["encoded"]`` (see the module docstring).

    Example: ``storage_parts("up.weight", "narrow-rans", w, base, meta, "up", encoded=None)``.
    """
    name = storage
    codec = storage_codec(name, tensor)
    parts = codec.encode(weight, base, context_for(tensor, parse_meta(meta, tensor), meta, encoded=encoded))
    bad = [p for p in parts if p == META_PART or not _PART.match(p)]
    if bad:
        raise ValueError(f"{tensor}: base storage {name!r} returned parts named {bad} (the names must match "
                         f"{_PART.pattern} and not be {META_PART!r}, which the format writes)")
    if not any(p.startswith(BASE_PREFIX) for p in parts):
        raise ValueError(f"{tensor}: base storage {name!r} returned no base_* part (base mode reads only those)")
    out = {storage_key(prefix, name, META_PART): meta}
    for part, t in parts.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{tensor}: base storage {name!r} returned {type(t).__name__} for part {part!r}")
        out[storage_key(prefix, name, part)] = t.detach().to("cpu").contiguous()
    return out


def stored_sizes(parts: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``{"base", "delta", "meta"}`` bytes of one weight's stored parts (keys: resident suffixes or storage keys)."""
    sizes = {"base": 0, "delta": 0, "meta": 0}
    for key, t in parts.items():
        part = key.rsplit(".", 1)[-1]
        kind = ("meta" if part == META_PART else
                "base" if part in BASE_OUTPUTS or (STORAGE_TOKEN in key and part.startswith(BASE_PREFIX)) else "delta")
        sizes[kind] += t.numel() * t.element_size()
    return sizes


# ==================================================================== read
@dataclass(frozen=True)
class StoredWeight:
    """The stored keys of one weight laid out by a storage: ``parts[part] = stored key``."""

    prefix: str
    storage: str
    parts: dict[str, str]

    @property
    def name(self) -> str:
        return f"{self.prefix}.weight"

    def keys(self, base_only: bool = False) -> list[str]:
        return [k for p, k in self.parts.items() if not base_only or is_base_part(p)]


def storage_weights(keys: Iterable[str]) -> dict[str, StoredWeight]:
    """The weights laid out by a storage among stored ``keys``, by prefix (each has its meta part).

    Example: ``storage_weights(index)["model.layers.0.mlp.up_proj"].storage`` -> ``'coded'``.
    """
    out = {}
    for prefix, group in group_storage_keys(keys).items():
        if META_PART not in group.parts:
            raise TpdeFormatError(f"{prefix}.weight", f"stored by base storage {group.codec!r} without its "
                                                      f"{storage_key(prefix, group.codec, META_PART)} tensor")
        out[prefix] = StoredWeight(prefix, group.codec, dict(group.parts))
    return out


def storage_suffixes(weights: Iterable[StoredWeight]) -> dict[str, list[str]]:
    """``{storage: [the key suffix of each part, "tpde_storage.S.meta", ...]}`` over ``weights``, meta first."""
    out: dict[str, set[str]] = {}
    for w in weights:
        out.setdefault(w.storage, set()).update(w.parts)
    return {s: [f"{STORAGE_TOKEN}.{s}.{p}" for p in sorted(parts, key=lambda p: (p != META_PART, p))]
            for s, parts in sorted(out.items())}


def _cpu(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the CPU, detached: ``t`` itself when it already is (what a load reads). Each torch call here would
    release and re-take the GIL, which on a load's decode workers waits for the loading thread's Python."""
    return t if t.device.type == "cpu" and not t.requires_grad else t.detach().to("cpu")


_parsed: dict[bytes, StoredMeta] = {}  # meta bytes -> parse (StoredMeta is frozen; bounded below)


def _parse(meta: torch.Tensor, name: str) -> StoredMeta:
    """:func:`parse_meta`, remembered by the meta's bytes: a load parses each meta twice (its decode worker, then
    the loading thread), and the parse reads the meta element by element (a GIL round trip each). Only successful
    parses are kept, and a parse depends on the bytes alone (``name`` only names the tensor in an error)."""
    meta = _cpu(meta)
    if meta.dtype != torch.int64 or meta.dim() != 1 or not meta.is_contiguous():
        return parse_meta(meta, name)
    key = meta.numpy().tobytes()
    stored = _parsed.get(key)
    if stored is None:
        stored = parse_meta(meta, name)
        if len(_parsed) >= 4096:
            _parsed.clear()
        _parsed[key] = stored
    return stored


def _split(name: str, parts: Mapping[str, torch.Tensor]) -> tuple[StoredMeta, dict[str, torch.Tensor]]:
    if META_PART not in parts:
        raise TpdeFormatError(name, "its stored meta is missing")
    stored = _parse(parts[META_PART], name)
    return stored, {p: _cpu(t) for p, t in parts.items() if p != META_PART}


def _context(name: str, stored: StoredMeta, parts: Mapping[str, torch.Tensor]) -> CodecContext:
    return context_for(name, stored, _cpu(parts[META_PART]))


def _run(name: str, storage: str, what: str, fn):
    """Run a storage's decode; anything it raises on bad bytes becomes a :class:`TpdeFormatError` naming ``name``."""
    try:
        return fn()
    except TpdeFormatError as exc:
        if exc.tensor_name is None:
            raise TpdeFormatError(name, str(exc)) from None
        raise
    except (ValueError, IndexError, KeyError, RuntimeError, TypeError, OverflowError) as exc:
        raise TpdeFormatError(name, f"base storage {storage!r} could not decode its {what} "
                                    f"({type(exc).__name__}: {exc}); the stored parts are corrupt") from None


def _take(kind: str, storage: str, parts: Mapping[str, torch.Tensor], use_prefetch: bool) -> tuple[bool, object]:
    """A result that a load's workers decoded ahead (:mod:`tpde_hf.loading.storage_prefetch`), found by the
    parts' bytes."""
    if not use_prefetch:
        return False, None
    from tpde_hf.loading.storage_prefetch import take

    return take(kind, storage, parts)


def decode_base(name: str, storage: str, parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``meta, qweight, scales, zeros`` (the resident base) from the meta and ``base_*`` parts, checked.

    Example: ``decode_base("up.weight", "coded", {"meta": m, "base_q": q, ...})["qweight"]``.
    """
    stored, rest = _split(name, parts)
    base_parts = {p: t for p, t in rest.items() if p.startswith(BASE_PREFIX)}
    codec = storage_codec(storage, name)
    got = _run(name, storage, "base", lambda: codec.decode_base(base_parts, _context(name, stored, parts)))
    return _checked_base(name, storage, stored, parts, got)


def _checked_base(name: str, storage: str, stored: StoredMeta, parts: Mapping[str, torch.Tensor],
                  got: object) -> dict[str, torch.Tensor]:
    """The meta and a storage's decoded base, checked against the meta's shapes (see :func:`decode_base`)."""
    (out_f, in_f), g = stored.shape, stored.params.group_size
    ng = -(-in_f // g)
    expect = {"qweight": (torch.uint8, (out_f, ng * g // 2)), "scales": (torch.float16, (out_f, ng)),
              "zeros": (torch.uint8, (out_f, -(-ng // 2)))}
    out = {META_PART: parts[META_PART].detach().to("cpu")}
    for key, (dtype, shape) in expect.items():
        t = got.get(key) if isinstance(got, Mapping) else None
        if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != shape:
            have = f"{t.dtype}{list(t.shape)}" if isinstance(t, torch.Tensor) else repr(type(t).__name__)
            raise TpdeFormatError(name, f"base storage {storage!r} decoded {key} as {have}, "
                                        f"expected {dtype}{list(shape)} (corrupt parts)")
        out[key] = t.contiguous()
    if not bool(torch.isfinite(out["scales"]).all()):
        raise TpdeFormatError(name, "decoded scales contain inf or NaN (corrupt parts)")
    return out


def decode_weight(name: str, storage: str, parts: Mapping[str, torch.Tensor], verify: bool = False,
                  use_prefetch: bool = True) -> torch.Tensor:
    """The exact weight from all stored parts; ``verify`` also checks it against the meta's checksum
    (``use_prefetch``: a load's workers may have decoded it already, see :mod:`tpde_hf.loading.storage_prefetch`).

    Example: ``decode_weight("up.weight", "coded", parts, verify=True)``.
    """
    stored, rest = _split(name, parts)
    found, w = _take("weight", storage, parts, use_prefetch)
    if not found:
        codec = storage_codec(storage, name)
        w = _run(name, storage, "weight", lambda: codec.decode(rest, _context(name, stored, parts)))
    return _checked_weight(name, storage, stored, w, verify)


def decode_weight_ahead(name: str, storage: str, parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """:func:`decode_weight` for a load's decode workers (:mod:`tpde_hf.loading.storage_prefetch`), whose result
    the loading thread checks against the meta when it takes it (:func:`decode_weight`). A storage that declares
    ``decodes_without_meta = True`` (its parts describe themselves and carry their own checksums, as
    ``narrow-rans``'s do) is decoded without parsing the meta here: the parse reads it element by element, a GIL
    round trip each, which on a worker waits for the loading thread. Example: ``decode_weight_ahead(n, s, parts)``.
    """
    codec = storage_codec(storage, name)
    if not getattr(codec, "decodes_without_meta", False):
        return decode_weight(name, storage, parts, use_prefetch=False)
    if META_PART not in parts:
        raise TpdeFormatError(name, "its stored meta is missing")
    rest = {p: _cpu(t) for p, t in parts.items() if p != META_PART}
    return _run(name, storage, "weight", lambda: codec.decode(rest, CodecContext(name)))


def _checked_weight(name: str, storage: str, stored: StoredMeta, w: object, verify: bool) -> torch.Tensor:
    """A storage's decoded weight, checked against the meta (see :func:`decode_weight`)."""
    if not isinstance(w, torch.Tensor) or w.dtype != stored.dtype or tuple(w.shape) != stored.shape:
        have = f"{w.dtype}{list(w.shape)}" if isinstance(w, torch.Tensor) else type(w).__name__
        raise TpdeFormatError(name, f"base storage {storage!r} decoded {have}, the meta says "
                                    f"{stored.dtype}{list(stored.shape)} (corrupt parts)")
    if verify and tensor_checksum(w) != stored.checksum:
        raise TpdeFormatError(name, "checksum mismatch: the decoded weight differs from the original")
    return w


def resident_parts(name: str, storage: str, parts: Mapping[str, torch.Tensor],
                   use_prefetch: bool = True) -> dict[str, torch.Tensor]:
    """All seven resident tensors (``qweight`` ... ``meta``) of a weight stored by ``storage``
    (``use_prefetch``: see :func:`decode_weight`).

    The exact weight is decoded and re-encoded with the meta's parameters; the encode's checksum must
    equal the meta's, and the rebuilt meta the stored one, or nothing loads.
    """
    found, got = _take("resident", storage, parts, use_prefetch)
    if found:
        return got  # type: ignore[return-value]  # built and checked by the worker, as below
    stored = _parse(parts[META_PART], name) if META_PART in parts else None
    w = decode_weight(name, storage, parts, use_prefetch=use_prefetch)
    assert stored is not None  # decode_weight raised otherwise
    enc = encode_tensor(w, stored.params, name)
    if enc.checksum != stored.checksum:
        raise TpdeFormatError(name, f"base storage {storage!r} decoded a weight that differs from the original "
                                    "(checksum mismatch): the stored parts are corrupt")
    resident = enc.to_state_dict("x")
    if not torch.equal(resident["x.meta"], parts[META_PART].detach().to("cpu")):
        raise TpdeFormatError(name, "the rebuilt meta differs from the stored one (corrupt meta)")
    return {k[2:]: v for k, v in resident.items()}


def weight_part_keys(keys: Iterable[str], prefix: str) -> list[str]:
    """The stored keys of the weight ``prefix`` among ``keys``: its resident tensors or its storage's parts.

    Example: ``weight_part_keys(header, "model.layers.0.mlp.up_proj")``.
    """
    from tpde_hf.codec import SUFFIXES

    if not isinstance(keys, (set, frozenset, Mapping, type({}.keys()))):
        keys = set(keys)
    if f"{prefix}.meta" in keys:  # the resident layout: no scan
        return [f"{prefix}.{s}" for s in SUFFIXES if f"{prefix}.{s}" in keys]
    token = f"{prefix}.{STORAGE_TOKEN}."
    return sorted(k for k in keys if k.startswith(token) and k.count(".") == prefix.count(".") + 3)


def check_written(name: str, storage: str, parts: Mapping[str, torch.Tensor], source: torch.Tensor,
                  checksum: int, base: Mapping[str, torch.Tensor]) -> None:
    """A writer's check of one storage-laid weight as read back from disk: the exact weight decodes to
    ``source``'s bits, the meta holds ``checksum``, and the base decodes to the resident ``base``. Raises
    :class:`TpdeFormatError` naming ``name`` (the writer then writes nothing)."""
    stored, rest = _split(name, parts)
    if stored.checksum != checksum:
        raise TpdeFormatError(name, "stored checksum differs from the source's; nothing was written")
    codec = storage_codec(storage, name)
    if hasattr(codec, "decode_with_base"):  # optional: both from one decode (the base is not decoded twice)
        w, got = _run(name, storage, "weight", lambda: codec.decode_with_base(rest, _context(name, stored, parts)))
        w, got = _checked_weight(name, storage, stored, w, False), _checked_base(name, storage, stored, parts, got)
    else:
        w = decode_weight(name, storage, parts)
        got = decode_base(name, storage, {p: t for p, t in parts.items() if is_base_part(p)})
    if w.shape != source.shape or not torch.equal(w.contiguous().view(torch.uint8).flatten(),
                                                  source.contiguous().view(torch.uint8).flatten()):
        raise TpdeFormatError(name, f"base storage {storage!r} decoded a weight that differs from the source "
                                    "(codec bug); nothing was written")
    for k in BASE_OUTPUTS:
        if not torch.equal(got[k], base[k]):
            raise TpdeFormatError(name, f"base storage {storage!r} decoded a {k} that differs from the base "
                                        "(codec bug); nothing was written")


def expected_part_keys(keys: Iterable[str], prefix: str) -> dict[str, str]:
    """``{key suffix: stored key}`` of the weight ``prefix``: its storage's parts where ``keys`` hold any
    (``"tpde_storage.S.base_q"`` ...), else the seven resident tensors (present or not, so a caller can name
    the missing ones)."""
    found = [k for k in weight_part_keys(keys, prefix) if f".{STORAGE_TOKEN}." in k]
    if found:
        return {k[len(prefix) + 1:]: k for k in found}
    from tpde_hf.codec import SUFFIXES

    return {s: f"{prefix}.{s}" for s in SUFFIXES}


def split_suffixes(parts: Mapping[str, object]) -> tuple[str | None, dict[str, object]]:
    """``(storage, {part: value})`` of one weight's parts keyed by suffix (``"tpde_storage.S.meta"`` ...);
    ``(None, parts)`` for the resident layout. Raises :class:`TpdeFormatError` for two storages at once."""
    names = {s.split(".")[1] for s in parts if s.startswith(STORAGE_TOKEN + ".")}
    if not names:
        return None, dict(parts)
    if len(names) > 1 or len(names) == 1 and any(not s.startswith(STORAGE_TOKEN + ".") for s in parts):
        raise TpdeFormatError(None, f"parts of several layouts at once ({sorted(parts)})")
    (name,) = names
    return name, {s.split(".", 2)[2]: v for s, v in parts.items()}


def entry_failures(name: str, storage: str, parts: Mapping[str, torch.Tensor], entry: Mapping) -> list[str]:
    """What ``tpde verify`` finds wrong with one storage-laid weight against its manifest ``entry`` (empty: exact)."""
    from tpde_hf.format import dtype_name

    try:
        stored, _ = _split(name, parts)
        if stored.checksum != entry["checksum"]:
            return [f"{name}: its meta checksum differs from the manifest"]
        if dtype_name(stored.dtype) != entry["dtype"] or list(stored.shape) != entry["shape"]:
            return [f"{name}: stored as {dtype_name(stored.dtype)}{list(stored.shape)}, manifest says "
                    f"{entry['dtype']}{entry['shape']}"]
        decode_base(name, storage, {p: t for p, t in parts.items() if is_base_part(p)})
        w = decode_weight(name, storage, parts)
    except TpdeFormatError as exc:
        return [str(exc) if str(exc).startswith(name) else f"{name}: {exc}"]
    if tensor_checksum(w) != entry["checksum"]:
        return [f"{name}: decoded weight differs from the original (checksum mismatch)"]
    return []
