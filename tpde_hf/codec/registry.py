"""Named codecs that plug into the tpde format.

A codec is an object with a ``name``; it registers itself in the :class:`Registry` of its kind when
its module is imported, and the format records that name beside the tensors it wrote. A reader
looks the name up here, so a new codec arrives as a new module, never as a new branch in
:mod:`tpde_hf.codec.tensor_codec` or :mod:`tpde_hf.triton_kernels.dispatch`. (compressed-tensors'
registered compressors follow the same pattern.)

Three kinds exist:

* :data:`TENSOR_CODECS`: whole tensors stored as named parts that decode to one dense tensor,
  possibly against a context tensor (the reference model's tensor for a fine-tune stored as a
  delta, the previous checkpoint's tensor for a training checkpoint). They follow
  :class:`TensorCodec`; their parts are stored under :func:`stored_key`.
* :data:`BASE_STORAGE`: how a converted linear weight (4-bit base + delta) is laid out on disk; the
  loader turns the stored parts back into the resident base (and the exact weight). They follow
  :class:`BaseStorage`.
* :data:`DELTA_CODES`: the delta codes of the base + delta format (``rans``, ``class-width``).

Example::

    @TENSOR_CODECS.register
    class XorZstd:
        name = "xor-zstd"
        def encode(self, tensor, context): ...
        def decode(self, parts, context): ...

    codec = TENSOR_CODECS.get("xor-zstd")   # TpdeFormatError naming the codec if it is unknown
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

import torch

from tpde_hf.errors import TpdeFormatError

T = TypeVar("T")

_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")


class Registry(Generic[T]):
    """Codecs of one kind, by name.

    ``register`` accepts an instance or a class (instantiated with no arguments), so it works as a
    decorator. Registering a second codec under a taken name is an error: a name in a file must
    mean one thing.

    Example::

        reg = Registry("tensor codec")
        reg.register(MyCodec())
        reg.get("my-codec").decode(parts, context)
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._codecs: dict[str, T] = {}
        self._loaders: dict[str, Callable[[], None]] = {}

    def register(self, codec: T | type[T]) -> Any:
        obj = codec() if isinstance(codec, type) else codec
        name = getattr(obj, "name", None)
        if not isinstance(name, str) or not _NAME.match(name):
            raise ValueError(f"a {self.kind} needs a name of lowercase letters, digits and '-': got {name!r}")
        if name in self._codecs and type(self._codecs[name]) is not type(obj):
            raise ValueError(f"{self.kind} {name!r} is already registered by {type(self._codecs[name]).__name__}")
        self._codecs[name] = obj
        return codec

    def lazy(self, name: str, loader: Callable[[], None]) -> None:
        """Register ``name`` as provided by ``loader`` (usually an import), run on first ``get``.

        Keeps heavy codec modules out of ``import tpde_hf`` until a file needs them.
        """
        self._loaders[name] = loader

    def get(self, name: str, tensor: str | None = None) -> T:
        """The codec called ``name``; a :class:`TpdeFormatError` naming it (and ``tensor``) if unknown."""
        if name not in self._codecs and name in self._loaders:
            self._loaders.pop(name)()
        try:
            return self._codecs[name]
        except KeyError:
            known = ", ".join(sorted(self.names())) or "none"
            raise TpdeFormatError(tensor, f"unknown {self.kind} {name!r} (this tpde-hf knows: {known}); "
                                  "the file needs a newer tpde-hf or the plug-in that provides it") from None

    def names(self) -> list[str]:
        return sorted(set(self._codecs) | set(self._loaders))

    def __contains__(self, name: object) -> bool:
        return name in self._codecs or name in self._loaders

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


# ==================================================================== whole-tensor codecs
@dataclass
class CodecContext:
    """What a codec may use besides the tensor: its key, and the context tensor both sides hold.

    ``reference`` is the tensor of the same name in the model or checkpoint this one is coded
    against (None when there is none); ``options`` carries codec-specific settings (e.g. an
    optimizer's betas for a checkpoint delta).
    """

    key: str
    reference: torch.Tensor | None = None
    options: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class TensorCodec(Protocol):
    """A whole-tensor codec: ``decode(encode(t, ctx), ctx)`` is ``t`` bit for bit.

    ``encode`` returns the parts to store (plain tensors, any dtype) or None when the codec does
    not apply or does not pay (the writer then tries the next codec). ``decode`` must validate the
    parts and raise :class:`TpdeFormatError` naming ``context.key`` for anything malformed.
    """

    name: str

    def encode(self, tensor: torch.Tensor, context: CodecContext) -> dict[str, torch.Tensor] | None: ...

    def decode(self, parts: Mapping[str, torch.Tensor], context: CodecContext) -> torch.Tensor: ...


@runtime_checkable
class BaseStorage(Protocol):
    """An on-disk layout of one converted linear weight: its 4-bit base and its exact delta.

    The resident layout (``qweight, scales, zeros`` + the delta code's ``delta, lanes, tables, meta``)
    is what the modules compute with; a storage layer may store something smaller and rebuild it at
    load. Parts whose names start with ``base_`` hold the base: ``base`` mode reads only those, so
    it never reads the delta.

    * ``encode(weight, base, context)``: the parts to store; ``base`` is the resident base
      (``qweight, scales, zeros``) of ``weight``, which the storage must reproduce exactly;
    * ``decode_base(parts, context)``: ``qweight, scales, zeros`` from the ``base_`` parts alone;
    * ``decode(parts, context)``: the exact weight.

    A storage may declare ``reads_resident_delta = False`` when ``encode`` codes its own delta from the weight and
    the base: a writer then skips the resident delta encode and passes no ``context.options["encoded"]``. Absent,
    it counts as True (the writer runs the resident encode first and hands it over): the safe default.

    A storage may declare ``decodes_without_meta = True`` when ``decode`` needs nothing from the meta (its parts
    describe themselves and carry their own checksums): a load's decode workers then skip parsing the meta, and the
    loading thread still checks every result against it. Absent, it counts as False.
    """

    name: str

    def encode(self, weight: torch.Tensor, base: Mapping[str, torch.Tensor],
               context: CodecContext) -> dict[str, torch.Tensor]: ...

    def decode_base(self, parts: Mapping[str, torch.Tensor], context: CodecContext) -> dict[str, torch.Tensor]: ...

    def decode(self, parts: Mapping[str, torch.Tensor], context: CodecContext) -> torch.Tensor: ...


TENSOR_CODECS: Registry[TensorCodec] = Registry("tensor codec")
BASE_STORAGE: Registry[BaseStorage] = Registry("base storage")
DELTA_CODES: Registry[Any] = Registry("delta code")
#: Encoder-side 4-bit base quantizers (``minmax``, ``search``: :mod:`tpde_hf.codec.base_quantizers`); the decoder
#: reads q, scale and zero from the file, so the name is not stored.
BASE_QUANTIZERS: Registry[Any] = Registry("base quantizer")
for _name in ("minmax", "search"):  # built in, imported on first use (by name: the registry imports no codec)
    BASE_QUANTIZERS.lazy(_name, lambda: importlib.import_module("tpde_hf.codec.base_quantizers"))

#: Parts of a tensor ``K`` coded by tensor codec ``C`` are stored as ``K.tpde_codec.C.<part>``. ``K`` is a tensor,
#: so no real tensor of a checkpoint is named ``K.<anything>``, and a model's key renamings of ``K`` carry over.
CODEC_TOKEN = "tpde_codec"
_STORED = re.compile(rf"^(?P<key>.+)\.{CODEC_TOKEN}\.(?P<codec>[a-z0-9][a-z0-9-]*)\.(?P<part>[A-Za-z0-9_]+)$")


def stored_key(key: str, codec: str, part: str) -> str:
    """Example: ``stored_key("model.embed_tokens.weight", "ref-ord", "payload")``
    -> ``'model.embed_tokens.weight.tpde_codec.ref-ord.payload'``."""
    return f"{key}.{CODEC_TOKEN}.{codec}.{part}"


def stored_parts(key: str, codec: str, parts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``parts`` under their stored keys (see :func:`stored_key`)."""
    return {stored_key(key, codec, p): t for p, t in parts.items()}


@dataclass(frozen=True)
class CodedTensorKeys:
    """The stored keys of one codec-coded tensor: ``parts[part] = stored key``."""

    key: str
    codec: str
    parts: dict[str, str]


def group_coded_keys(keys: Iterable[str]) -> dict[str, CodedTensorKeys]:
    """Group stored keys by the tensor they code; keys of no codec are left out.

    A tensor coded by two codecs at once is malformed and raises :class:`TpdeFormatError`.

    Example: ``group_coded_keys(["w.tpde_codec.ref-ord.payload", "b"])["w"].codec`` -> ``'ref-ord'``.
    """
    out: dict[str, CodedTensorKeys] = {}
    for k in keys:
        m = _STORED.match(k)
        if m is None:
            continue
        key, codec = m["key"], m["codec"]
        entry = out.setdefault(key, CodedTensorKeys(key, codec, {}))
        if entry.codec != codec:
            raise TpdeFormatError(key, f"stored by two codecs ({entry.codec!r} and {codec!r})")
        entry.parts[m["part"]] = k
    return out


def decode_coded(key: str, codec: str, parts: Mapping[str, torch.Tensor],
                 reference: torch.Tensor | None = None, **options: Any) -> torch.Tensor:
    """Decode one coded tensor through its registered codec.

    Example: ``decode_coded("w", "ref-ord", {"payload": p, "meta": m}, reference=base_w)``.
    """
    return TENSOR_CODECS.get(codec, key).decode(parts, CodecContext(key, reference, dict(options)))


# ==================================================================== base storage keys
#: Parts of a converted weight ``X`` (prefix, e.g. ``model.layers.0.mlp.up_proj``) stored by base storage ``S``
#: are stored as ``X.tpde_storage.S.<part>``; ``<part>`` ``meta`` is the weight's resident ``meta`` (written by
#: the format, never by the storage), parts named ``base_*`` hold the base. ``X`` is a module path, so no real
#: tensor is named ``X.tpde_storage...``, and a model's key renamings of ``X`` carry over to the parts.
STORAGE_TOKEN = "tpde_storage"
_STORAGE = re.compile(rf"^(?P<key>.+)\.{STORAGE_TOKEN}\.(?P<codec>[a-z0-9][a-z0-9-]*)\.(?P<part>[A-Za-z0-9_]+)$")


def storage_key(prefix: str, storage: str, part: str) -> str:
    """Example: ``storage_key("model.layers.0.mlp.up_proj", "coded", "base_q")``
    -> ``'model.layers.0.mlp.up_proj.tpde_storage.coded.base_q'``."""
    return f"{prefix}.{STORAGE_TOKEN}.{storage}.{part}"


def group_storage_keys(keys: Iterable[str]) -> dict[str, CodedTensorKeys]:
    """Group stored keys by the weight prefix whose parts they are (``codec`` = the storage's name).

    A weight stored by two storages at once is malformed and raises :class:`TpdeFormatError`.

    Example: ``group_storage_keys(["m.up.tpde_storage.coded.meta", "b"])["m.up"].codec`` -> ``'coded'``.
    """
    out: dict[str, CodedTensorKeys] = {}
    for k in keys:
        m = _STORAGE.match(k)
        if m is None:
            continue
        key, codec = m["key"], m["codec"]
        entry = out.setdefault(key, CodedTensorKeys(key, codec, {}))
        if entry.codec != codec:
            raise TpdeFormatError(f"{key}.weight", f"stored by two base storages ({entry.codec!r} and {codec!r})")
        entry.parts[m["part"]] = k
    return out
