"""``tpde verify`` of a delta repo: decode every reference-coded tensor against its reference and compare it
with the manifest (dtype, shape, checksum of the original tensor).

Called by :func:`tpde_hf.conversion.verify.verify_repo` before it checks the other tensors. The reference is
resolved as a load resolves it (recorded commit, Hugging Face cache, offline mode) and each reference tensor used
is checked against its recorded xxh3.

Example::

    fail: list[str] = []
    handled = verify_reference_coded(qc, manifest, stored, fail)   # {tensor name: its stored keys}
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tpde_hf.codec import tensor_checksum
from tpde_hf.codec.registry import CodecContext, group_coded_keys
from tpde_hf.errors import TpdeFormatError


def verify_reference_coded(qc: dict, manifest: dict[str, dict], stored: dict[str, Any],
                           fail: list[str]) -> dict[str, list[str]]:
    """Check every reference-coded tensor of a repo; append failures to ``fail``.

    ``stored``: stored key -> its header entry (``.file``: the shard). Returns the tensor names handled with their
    stored keys (so that the caller accounts for them).
    """
    from tpde_hf.reference import CODEC_NAMES
    from tpde_hf.reference.load import PART, LoadReference

    groups = {k: g for k, g in group_coded_keys(stored).items() if g.codec in CODEC_NAMES}
    if not groups:
        return {}
    handled = {k: list(g.parts.values()) for k, g in groups.items()}
    info = qc.get("reference")
    if not isinstance(info, dict):
        fail.append("config.json: the repo stores reference-coded tensors but quantization_config has no 'reference'")
        return handled
    try:
        ref = LoadReference(info)
        ref.resolved()
    except TpdeFormatError as exc:
        fail.append(str(exc))
        return handled
    from safetensors import safe_open

    import tpde_hf.reference.codec as C

    for name, g in sorted(groups.items()):
        entry = manifest.get(name)
        if entry is None:
            fail.append(f"{name}: stored reference-coded ({g.codec}) but not in the manifest")
            continue
        if set(g.parts) != {PART}:
            fail.append(f"{name}: {g.codec} parts {sorted(g.parts)}, expected ['{PART}']")
            continue
        key = g.parts[PART]
        try:
            with safe_open(str(stored[key].file), framework="pt") as fh:
                blob = fh.get_tensor(key)
            h, _, _ = C.read_header(blob, g.codec, name)
            reference = ref.tensor(int(np.int64(h[3])), name)
            t = C.TENSOR_CODECS.get(g.codec, name).decode({PART: blob}, CodecContext(name, reference))
        except (TpdeFormatError, OSError) as exc:
            fail.append(str(exc))
            continue
        dtype = str(t.dtype).replace("torch.", "")
        if dtype != entry["dtype"] or list(t.shape) != list(entry["shape"]):
            fail.append(f"{name}: decodes to {dtype}{list(t.shape)}, manifest says {entry['dtype']}{entry['shape']}")
        elif tensor_checksum(t) != entry["checksum"]:
            fail.append(f"{name}: checksum mismatch (the {g.codec} tensor decoded against the reference differs "
                        "from the original)")
    return handled
