"""``TpdeConfig``: the ``quantization_config`` of a tpde repo, plus the runtime options of a load.

A tpde repo's ``config.json`` carries the *format* fields written by the converter
(:func:`tpde_hf.format.quantization_config_dict`): ``format_version``, ``bits``, ``group_size``,
``delta_code`` (``"rans"``, or ``"class-width"`` from format version 2; absent means rANS), ``lane_len``,
``prob_bits``, ``sym_k``, ``sym_m``, ``source_dtype``, ``modules_to_not_convert``, ``integrity`` (``"xxh3_64"``:
every shard carries per-tensor checksums, see :mod:`tpde_hf.integrity`; absent in repos written before them),
``cast_from`` (only in a repo converted with ``--dtype``: the source's floating dtypes, e.g. ``"float32"``, that
were cast to ``source_dtype``; the repo is exact with respect to the cast model, not the original). A field this
tpde-hf does not know is kept as it is, so a repo written by a newer one still loads.
They describe the bytes on disk and cannot be changed at load time.

The *runtime* fields choose how a load uses those bytes; pass them in a ``TpdeConfig`` to
``from_pretrained`` and they are merged over the stored config:

* ``mode``: ``"lossless"``, ``"lossless-offload"``, ``"base"`` or ``"dequantize"``; ``None``
  (default) picks ``"lossless"`` when the model is loaded onto a CUDA GPU and ``"dequantize"``
  otherwise (on CPU, rebuilding the dense weights once at load is hundreds of times faster per
  token than decoding the delta at every forward: see ``benchmarks/results/modes.json``).
* ``verify``: decode every converted weight once at load and compare it with the checksum of the
  original tensor (raises :class:`~tpde_hf.errors.TpdeFormatError` naming the tensor on mismatch).
* ``check_integrity`` (default ``True``): before transformers reads a weight, hash every stored byte the
  load will use (xxh3, a small fraction of the load time) and compare it with the checksum written at
  conversion; a damaged file raises :class:`~tpde_hf.errors.TpdeFormatError` naming the tensor and the
  file. ``False`` skips the check, for those who know their files are intact (e.g. checked by
  ``tpde verify``) and want the last bit of load time; a damaged file may then load wrong weights.
* ``fused_gemv`` (CUDA only): allow the fused decode+GEMV Triton kernel for small batches. Off by
  default, because it is equal to the original only within float32-accumulation tolerance; by
  default every GPU matmul uses the exact reconstructed weight, so outputs stay bit-identical.

Example::

    import tpde_hf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained("some/tpde-repo", quantization_config=tpde_hf.TpdeConfig(mode="base"))
"""

from __future__ import annotations

import copy
from typing import Any

from transformers.utils.quantization_config import QuantizationConfigMixin

from tpde_hf.codec import FORMAT_VERSION
from tpde_hf.codec.tensor_codec import DELTA_CODES
from tpde_hf.errors import TpdeFormatError
from tpde_hf.format import QUANT_METHOD, RUNTIME_MODES
from tpde_hf.integrity import ALGO as INTEGRITY_ALGO

#: Fields written by the converter; they describe the stored bytes and cannot be overridden.
FORMAT_FIELDS = (
    "format_version",
    "bits",
    "group_size",
    "delta_code",
    "lane_len",
    "prob_bits",
    "sym_k",
    "sym_m",
    "source_dtype",
    "modules_to_not_convert",
    "integrity",
    "cast_from",
    "storage",
)
#: Fields a load may choose; they are never written back to ``config.json``.
RUNTIME_FIELDS = ("mode", "verify", "fused_gemv", "check_integrity")
#: ``mode=None`` resolves to one of these, by the device the model is loaded onto.
DEFAULT_GPU_MODE = "lossless"
DEFAULT_CPU_MODE = "dequantize"


class TpdeConfig(QuantizationConfigMixin):
    """Quantization config for tpde repos (``quant_method="tpde"``).

    Build one to pass runtime options to ``from_pretrained``; the stored config of the repo
    provides the format fields. Passing a format field that differs from the stored one is an
    error (the bytes on disk cannot be reinterpreted).

    Args:
        mode: runtime mode (see module docstring); ``None`` picks by device.
        verify: check every decoded weight against the original checksum at load.
        fused_gemv: on CUDA, let small batches (decode) use the fused decode+GEMV kernel: faster, and
            equal to the original within float32-accumulation tolerance instead of bit for bit.
        check_integrity: compare every stored byte the load reads with its shard's checksum (default).
            ``False`` is for people who know what they are doing: a damaged file then loads silently.
        **kwargs: format fields (normally only read from ``config.json``) and any future fields,
            which are kept so that a repo written by a newer tpde-hf round-trips.

    Example::

        cfg = TpdeConfig(mode="lossless", verify=True)
        cfg.mode  # 'lossless'
    """

    def __init__(self, mode: str | None = None, verify: bool = False, fused_gemv: bool = False,
                 check_integrity: bool = True, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.mode = mode
        self.verify = bool(verify)
        self.fused_gemv = bool(fused_gemv)
        self.check_integrity = bool(check_integrity)
        kwargs.pop("quant_method", None)
        self._explicit_runtime = {"mode"} if mode is not None else set()
        if verify:
            self._explicit_runtime.add("verify")
        if fused_gemv:
            self._explicit_runtime.add("fused_gemv")
        if not check_integrity:
            self._explicit_runtime.add("check_integrity")
        for field in FORMAT_FIELDS:
            setattr(self, field, kwargs.pop(field, None))
        self._explicit_format = {f for f in FORMAT_FIELDS if getattr(self, f) is not None}
        self._extra = dict(kwargs)  # unknown (future) fields, kept verbatim
        for key, value in kwargs.items():
            setattr(self, key, value)
        self._check_mode()

    # ------------------------------------------------------------------ validation
    def _check_mode(self) -> None:
        if self.mode is not None and self.mode not in RUNTIME_MODES:
            raise ValueError(
                f"tpde: unsupported mode {self.mode!r}; choose one of {list(RUNTIME_MODES)} (or None for auto)"
            )

    def check_format(self, source: str = "config.json") -> None:
        """Check the stored format fields; ``source`` names the file they came from in errors.

        Raises :class:`~tpde_hf.errors.TpdeFormatError` when the format version is newer than this
        tpde-hf or a field is missing or malformed.
        """
        version = self.format_version
        if version is None:
            raise TpdeFormatError(source, "quantization_config has no 'format_version': not a tpde repo config")
        if not isinstance(version, int) or version < 1:
            raise TpdeFormatError(source, f"quantization_config format_version {version!r} is malformed")
        if version > FORMAT_VERSION:
            raise TpdeFormatError(
                source,
                f"tpde format version {version} is newer than this tpde-hf supports ({FORMAT_VERSION}); "
                "upgrade tpde-hf (pip install -U tpde-hf)",
            )
        if self.delta_code is not None and self.delta_code not in DELTA_CODES:
            raise TpdeFormatError(
                source, f"quantization_config delta_code={self.delta_code!r} is unknown to this tpde-hf "
                        f"(it reads {list(DELTA_CODES)}); upgrade tpde-hf (pip install -U tpde-hf)")
        if self.delta_code == "class-width" and version < 2:
            raise TpdeFormatError(source, "quantization_config: delta_code 'class-width' needs format_version 2")
        if self.integrity is not None and self.integrity != INTEGRITY_ALGO:
            raise TpdeFormatError(
                source, f"quantization_config integrity={self.integrity!r} is unknown to this tpde-hf (it checks "
                        f"{INTEGRITY_ALGO!r}): the config is damaged, or upgrade tpde-hf (pip install -U tpde-hf)")
        if self.storage is not None:
            from tpde_hf.codec.encoded import known_storage

            if not isinstance(self.storage, str) or not known_storage(self.storage):
                raise TpdeFormatError(
                    source, f"quantization_config storage={self.storage!r} is a base storage unknown to this tpde-hf; "
                            "upgrade tpde-hf (pip install -U tpde-hf) or install the plug-in that provides it")
        if self.bits not in (None, 4):
            raise TpdeFormatError(source, f"quantization_config bits={self.bits!r} unsupported (only 4)")

    # ------------------------------------------------------------------ dequantize flag read by transformers
    @property
    def dequantize(self) -> bool:
        """``True`` when the load rebuilds dense weights (read by transformers' loading code)."""
        return self.mode == "dequantize"

    # ------------------------------------------------------------------ merge with the stored config
    def get_loading_attributes(self) -> dict[str, Any]:
        """The runtime fields set on this config, plus the format fields it pins (checked, not applied).

        transformers copies these onto the stored config when a ``TpdeConfig`` is passed to
        ``from_pretrained`` for a repo that already has one.
        """
        attrs: dict[str, Any] = {f: getattr(self, f) for f in RUNTIME_FIELDS if f in self._explicit_runtime}
        if self._explicit_format:
            attrs["_requested_format"] = {f: getattr(self, f) for f in self._explicit_format}
        return attrs

    def check_requested_format(self) -> None:
        """Raise if the runtime config passed to ``from_pretrained`` asked for different format fields."""
        requested = getattr(self, "_requested_format", None) or {}
        for field, value in requested.items():
            stored = getattr(self, field)
            if value != stored:
                raise ValueError(
                    f"tpde: {field}={value!r} was passed to from_pretrained but the repo stores {field}={stored!r}; "
                    f"format fields ({', '.join(FORMAT_FIELDS)}) describe the bytes on disk and cannot be overridden. "
                    f"Only {list(RUNTIME_FIELDS)} can be chosen at load."
                )

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """The stored form: ``quant_method`` and the format fields (runtime options are not saved).

        ``integrity`` is left out: it promises checksums in every shard, so only what writes them sets it
        (the converter, :func:`tpde_hf.integrity.add_repo_checksums`). ``save_pretrained`` writes shards
        without them, and ``push_to_hub`` uploads before tpde can add them.
        """
        out: dict[str, Any] = {"quant_method": QUANT_METHOD}
        for field in FORMAT_FIELDS:
            value = getattr(self, field)
            if value is not None and field != "integrity":
                out[field] = copy.deepcopy(value)
        out.update(copy.deepcopy(self._extra))
        return out

    def runtime_dict(self) -> dict[str, Any]:
        """The runtime options of this load, e.g. ``{'mode': 'lossless', 'verify': False}``."""
        return {f: getattr(self, f) for f in RUNTIME_FIELDS}

    def __iter__(self):
        yield from self.to_dict().items()

    def __repr__(self) -> str:
        return f"TpdeConfig(runtime={self.runtime_dict()}, stored={self.to_dict()})"
