"""optimum integration: ``TpdeOptimumQuantizer``, following optimum's ``OptimumQuantizer`` convention.

``from_pretrained`` takes what :func:`~tpde_hf.conversion.convert` takes as a source (a Hub repo
id, a local folder, a ``.gguf`` file) or an in-memory ``PreTrainedModel``; ``quantize(save_dir)``
writes the verified tpde repo and returns the :class:`~tpde_hf.conversion.ConversionReport`.

Example::

    from tpde_hf.conversion import TpdeOptimumQuantizer

    quantizer = TpdeOptimumQuantizer.from_pretrained("HuggingFaceTB/SmolLM2-135M", group_size=64)
    report = quantizer.quantize("smollm2-tpde")
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from optimum.quantization_base import OptimumQuantizer

from tpde_hf.conversion.api import convert
from tpde_hf.conversion.errors import ConversionError
from tpde_hf.conversion.report import ConversionReport


class TpdeOptimumQuantizer(OptimumQuantizer):
    """Converts a model to tpde (4-bit base + lossless delta) with optimum's quantizer interface.

    Keyword options given to :meth:`from_pretrained` (``group_size``, ``delta_code``, ``keep_dense``, ``include``,
    ``exclude``, ``workers``, ``revision``, ``token``...) are passed on to ``convert``; options given
    to :meth:`quantize` override them for that call.
    """

    def __init__(self, source: str | os.PathLike | Any, **convert_kwargs: Any):
        self.source = source
        self.convert_kwargs = dict(convert_kwargs)

    @classmethod
    def from_pretrained(cls, model_or_path: str | Path | Any, file_name: str | None = None,
                        **convert_kwargs: Any) -> TpdeOptimumQuantizer:
        """``model_or_path``: Hub id, folder, ``.gguf`` file or a ``PreTrainedModel``; ``file_name``: a GGUF file."""
        if file_name is not None:
            convert_kwargs.setdefault("gguf_file", file_name)
        return cls(model_or_path, **convert_kwargs)

    def quantize(self, save_dir: str | Path, file_prefix: str | None = None, **kwargs: Any) -> ConversionReport:
        """Write the tpde repo to ``save_dir`` (verified, moved into place only when complete)."""
        if file_prefix is not None:
            raise ConversionError("file_prefix is not supported: a tpde repo uses the standard shard names")
        options = {**self.convert_kwargs, **kwargs}
        if isinstance(self.source, (str, os.PathLike)):
            return convert(self.source, save_dir, **options)
        if not hasattr(self.source, "save_pretrained"):
            raise ConversionError(f"cannot convert a {type(self.source).__name__}: pass a model id, a folder, a "
                                  ".gguf file or a transformers PreTrainedModel")
        # An in-memory model: save it as a plain checkpoint first, then convert that (same code path).
        with tempfile.TemporaryDirectory(prefix="tpde-optimum-", dir=Path(save_dir).absolute().parent) as tmp:
            self.source.save_pretrained(tmp)
            return convert(tmp, save_dir, **options)
