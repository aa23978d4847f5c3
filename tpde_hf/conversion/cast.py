"""``dtype=`` (``tpde convert --dtype``): the source's floating tensors cast to one dtype before anything is encoded.

A conversion is exact with respect to what it reads. With ``dtype=`` it reads the source *cast* to that dtype,
as ``from_pretrained(..., dtype=...)`` casts it: every floating tensor (linear weights, embeddings, norms,
biases, floating buffers) goes through torch's round-to-nearest-even ``tensor.to(dtype)``; integer and bool
tensors are kept. The cast copy is staged as safetensors in the partial folder, one tensor in memory at a
time (:func:`stage_cast`; ``.bin`` and GGUF sources are cast while they are staged anyway), and everything
after it (encoding, the bit-for-bit verification, the manifest, ``tpde verify``) checks against the cast
tensors. The repo is then an exact copy of the *cast* model, not of the original: its ``config.json``
(``quantization_config.cast_from``, ``dtype``), the conversion report and the model card say so
(:class:`Cast`).

A cast that turns a finite value into ±inf is refused, never done silently: a float32 or bfloat16 value
beyond float16's ±65504 (or a float32 value beyond bfloat16's ±3.39e38) raises a
:class:`~tpde_hf.conversion.errors.ConversionError` that names the tensor, the number of such values and
the largest magnitude (:func:`cast_tensor`). Values too small for the target (float16 subnormals, zeros)
are the ordinary rounding of a cast, as in ``from_pretrained(dtype=...)``.

Example::

    cast = stage_cast(src.weight_files, staging, torch.bfloat16)  # None when no tensor changes dtype
    cast.describe()  # 'exact copy of the source cast to bfloat16 (the source is float32)'
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tpde_hf.conversion.errors import ConversionError
from tpde_hf.conversion.streaming import ShardWriter, TensorInfo, load_tensor, read_header

CAST_RECORD_NAME = ".cast.json"  # in the staging folder (hidden: never carried), read back by a resumed run


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


@dataclass
class Cast:
    """What a ``dtype=`` cast changed: the dtype cast to, the floating dtypes cast from, how many tensors.

    Example::

        Cast("bfloat16", ["float32"], tensors=101, floating=101).describe()
        # 'exact copy of the source cast to bfloat16 (the source is float32)'
    """

    dtype: str  # what every floating tensor is now
    cast_from: list[str]  # the source dtypes that changed, sorted
    tensors: int  # tensors whose dtype changed
    floating: int  # floating tensors of the source (the others already had ``dtype``)

    @property
    def config_value(self) -> str:
        """``quantization_config.cast_from``: the source dtypes, comma-separated (``"float32"``)."""
        return ",".join(self.cast_from)

    def describe(self) -> str:
        """One plain sentence for the summary, the card and the logs."""
        source = ", ".join(self.cast_from)
        if self.tensors == self.floating:
            return f"exact copy of the source cast to {self.dtype} (the source is {source})"
        return (f"exact copy of the source cast to {self.dtype} ({self.tensors} of its {self.floating} floating "
                f"tensors were {source}, the others {self.dtype} already)")

    @classmethod
    def of(cls, dtype: torch.dtype, source_dtypes: list[torch.dtype]) -> Cast | None:
        """The record of casting floating tensors of ``source_dtypes`` (one entry per tensor) to ``dtype``;
        None when none of them changes dtype.

        Example::

            Cast.of(torch.bfloat16, [torch.float32, torch.bfloat16]).tensors  # 1
        """
        changed = [d for d in source_dtypes if d != dtype]
        if not changed:
            return None
        return cls(dtype_name(dtype), sorted({dtype_name(d) for d in changed}), len(changed), len(source_dtypes))


def cast_tensor(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor.to(dtype)`` for a floating tensor (others are returned as they are); a finite value that the
    cast would turn into ±inf raises :class:`ConversionError` naming ``name``.

    Example::

        cast_tensor("w", torch.tensor([1.0, 7e4]), torch.float16)  # ConversionError: 'w': 1 value(s) ...
    """
    if not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    out = tensor.to(dtype)
    limit = torch.finfo(dtype).max
    if limit >= torch.finfo(tensor.dtype).max or tensor.numel() == 0:
        return out  # a wider range cannot overflow
    lo, hi = torch.aminmax(tensor)  # one pass, no temporary: the exact test below runs only when it may matter
    if bool(lo >= -limit) and bool(hi <= limit):  # a NaN fails both and goes on to the exact test
        return out
    overflow = torch.isinf(out) & torch.isfinite(tensor)  # inf in the source stays inf: not an overflow
    if bool(overflow.any()):
        n = int(overflow.sum())
        largest = float(tensor[overflow].abs().max())
        raise ConversionError(
            f"{name!r}: {n} value(s) beyond {dtype_name(dtype)}'s range (largest magnitude {largest:.6g}, "
            f"{dtype_name(dtype)} holds up to {torch.finfo(dtype).max:.6g}) would become inf when cast from "
            f"{dtype_name(tensor.dtype)}; cast to bfloat16 (float32's range) or keep the stored dtype (no --dtype)"
        )
    return out


def _floating(info: TensorInfo) -> torch.dtype | None:
    """The torch dtype of a floating tensor of a header; None for integer, bool and unknown dtypes."""
    dtype = getattr(torch, info.torch_dtype_name, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def stage_cast(files: list[Path], staging: Path, dtype: torch.dtype) -> Cast | None:
    """Write ``files`` (safetensors) cast to ``dtype`` into ``staging`` as ``cast-0000i.safetensors``, one per
    source file, one tensor in memory at a time; record the file names (``.files.json``) and the cast
    (:data:`CAST_RECORD_NAME`). Returns None, writing nothing, when no floating tensor changes dtype.

    Example::

        stage_cast([Path("m/model.safetensors")], Path("staging"), torch.bfloat16)
    """
    headers = [read_header(f) for f in files]
    floating = [d for h in headers for d in map(_floating, h.values()) if d is not None]
    cast = Cast.of(dtype, floating)
    if cast is None:
        return None
    names = []
    for i, header in enumerate(headers):
        name = f"cast-{i:05d}.safetensors"
        with ShardWriter(staging / name) as w:
            for info in header.values():
                w.add_tensor(info.name, cast_tensor(info.name, load_tensor(info), dtype))
        names.append(name)
    (staging / ".files.json").write_text(json.dumps(names))
    write_cast_record(staging, cast)
    return cast


def write_cast_record(staging: Path, cast: Cast | None) -> None:
    """Record ``cast`` in the staging folder (nothing when None), for :func:`read_cast_record`."""
    if cast is not None:
        (staging / CAST_RECORD_NAME).write_text(json.dumps(asdict(cast)))


def read_cast_record(staging: Path) -> Cast | None:
    """The cast a staging folder holds (None: the staged weights are the source's own dtypes)."""
    path = staging / CAST_RECORD_NAME
    return Cast(**json.loads(path.read_text())) if path.is_file() else None
