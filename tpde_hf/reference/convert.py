"""``convert(..., reference=BASE)``: a fine-tune stored as exact deltas against its base model.

Steps (inside a hidden ``.<out>.tpde-ref-partial`` folder, moved into place at the end):

1. resolve the reference (:func:`tpde_hf.reference.resolve.resolve_reference`: Hub id with revision, pinned to
   the commit it resolves to, or a local folder);
2. run today's conversion of the fine-tune (verified tpde repo: linear weights as 4-bit base + delta);
3. per tensor that the reference also has (same name and shape), code it against the reference with every
   reference codec (``ref-same``, ``ref-sparse``, ``ref-ord``); keep the smallest of those, today's stored form
   and the dense tensor (a repo never grows), counting each stored tensor's header entry too;
4. decode every reference-coded tensor again and compare its bits with the fine-tune's;
5. write the shards (with :mod:`tpde_hf.integrity` checksums), ``config.json`` with
   ``quantization_config.reference`` (repo id or path, revision, commit, xxh3 of every reference tensor used),
   the manifest and report, and the card (``base_model``, ``base_model_relation: finetune``).

Example::

    from tpde_hf.reference.convert import convert_with_reference
    report = convert_with_reference("my-finetune", "my-finetune-tpde", "HuggingFaceTB/SmolLM2-135M@main")
    report["reference"]["bits_per_weight"]
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from tpde_hf.codec.registry import TENSOR_CODECS, CodecContext, group_coded_keys, stored_key
from tpde_hf.conversion.errors import ConversionError, VerificationError
from tpde_hf.reference.resolve import ReferenceReader, ResolvedReference, resolve_reference, tensor_digest

#: tried in this order; the smallest result wins (ties: the earlier, cheaper to decode)
CODEC_ORDER = ("ref-same", "ref-sparse", "ref-ord")
CONFIG_KEY = "reference"
SHARD_BYTES = 5 * 10**9


def entry_cost(name: str, nbytes: int) -> int:
    """Bytes one stored tensor costs, its header entry and checksum included (as the conversion counts them)."""
    from tpde_hf.conversion.assembly import stored_cost

    return stored_cost(name, nbytes)


def _stored_groups(keys: list[str]) -> dict[str, list[str]]:
    """Original tensor name -> its stored keys (tpde parts, expert slices, or the dense key itself)."""
    from tpde_hf.codec import SUFFIXES
    from tpde_hf.format import encoded_prefixes, parse_expert_slice

    groups: dict[str, list[str]] = {}
    prefixes = encoded_prefixes(keys)
    taken = set()
    for p in prefixes:
        parsed = parse_expert_slice(p)
        name = parsed[0] if parsed else f"{p}.weight"
        part_keys = [f"{p}.{s}" for s in SUFFIXES]
        groups.setdefault(name, []).extend(part_keys)
        taken.update(part_keys)
    from tpde_hf.reference.resolve import _storage_weights

    for w in _storage_weights(keys).values():  # tpde convert --storage S: X.tpde_storage.S.<part>
        groups.setdefault(w.name, []).extend(w.parts.values())
        taken.update(w.parts.values())
    for k in keys:
        if k not in taken:
            groups[k] = [k]
    return groups


def best_reference_coding(name: str, tensor: torch.Tensor, reference: torch.Tensor,
                          ref_index: int) -> tuple[str, dict[str, torch.Tensor]] | None:
    """The smallest reference coding of ``tensor``: ``(codec, parts)``, or None when no codec applies."""
    import tpde_hf.reference.codec  # noqa: F401  (registers the codecs)
    import tpde_hf.reference.sparse  # noqa: F401

    best = None
    ctx = CodecContext(name, reference, {"ref_index": ref_index})
    for codec in CODEC_ORDER:
        if codec not in TENSOR_CODECS:
            continue
        parts = TENSOR_CODECS.get(codec).encode(tensor, ctx)
        if parts is None:
            continue
        cost = sum(entry_cost(stored_key(name, codec, p), t.numel() * t.element_size()) for p, t in parts.items())
        if best is None or cost < best[0]:
            best = (cost, codec, parts)
        if codec == "ref-same":
            break  # nothing is smaller than a header
    return None if best is None else (best[1], best[2])


def convert_with_reference(source: str | os.PathLike, output_dir: str | os.PathLike, reference: str | os.PathLike, *,
                           reference_revision: str | None = None, token: str | bool | None = None,
                           overwrite: bool = False, push_to_hub: str | None = None, private: bool = False,
                           push_revision: str | None = None, create_pr: bool = False,
                           commit_message: str | None = None, endpoint: str | None = None,
                           cache_dir: str | os.PathLike | None = None,
                           keep_standalone: str | os.PathLike | None = None, **convert_kwargs: Any) -> dict:
    """Convert ``source`` into a delta repo against ``reference`` at ``output_dir``; returns the report dict.

    ``reference``: a local folder, or a Hub repo id with optional ``@revision`` (``reference_revision`` too).
    ``keep_standalone``: also keep the standalone conversion (no reference) there (benchmarks compare both).
    ``push_to_hub`` / ``push_revision`` / ``create_pr`` / ``commit_message``: push the result as
    :func:`tpde_hf.conversion.hub.push_to_hub` does (a branch, or a pull request against it).
    The other keyword arguments go to :func:`tpde_hf.conversion.convert`. Raises :class:`ConversionError`
    (bad input, existing output) or :class:`VerificationError`; nothing is left at ``output_dir`` on failure.
    """
    from tpde_hf.conversion.api import _check_output, convert

    out = Path(output_dir).expanduser().absolute()
    _check_output(out, overwrite)
    ref = resolve_reference(reference, revision=reference_revision, token=token, cache_dir=cache_dir,
                            endpoint=endpoint)
    partial = out.parent / f".{out.name}.tpde-ref-partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        std = partial / "standalone"
        convert(source, std, token=token, endpoint=endpoint, cache_dir=cache_dir, **convert_kwargs)
        stage = partial / "out"
        report = _recode(std, stage, ref, bool(convert_kwargs.get("trust_remote_code")))
        _move_into_place(stage, out)
        if keep_standalone is not None:
            shutil.rmtree(keep_standalone, ignore_errors=True)
            os.replace(std, keep_standalone)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    if push_to_hub:
        from tpde_hf.conversion.hub import push_to_hub as _push

        res = _push(out, push_to_hub, token=token, private=private, revision=push_revision, create_pr=create_pr,
                    commit_message=commit_message, endpoint=endpoint)
        report["pushed_to"] = push_to_hub
        report["push"] = {"revision": res.revision, "commit": res.commit, "pr_url": res.pr_url}
    return report


def convert_report(source: str | os.PathLike, output_dir: str | os.PathLike, reference: str | os.PathLike,
                   options: dict[str, Any]) -> Any:
    """``tpde_hf.conversion.convert(..., reference=...)``: the delta conversion, returning the repo's
    :class:`~tpde_hf.conversion.report.ConversionReport` with the reference summary as ``report.reference``."""
    from tpde_hf.conversion.report import ConversionReport
    from tpde_hf.format import CONVERSION_REPORT_NAME

    opts = dict(options)
    summary = convert_with_reference(source, output_dir, reference, **opts)
    out = Path(output_dir).expanduser().absolute()
    report = ConversionReport.from_dict(json.loads((out / CONVERSION_REPORT_NAME).read_text()))
    report.reference = summary
    return report


def _move_into_place(stage: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.tpde-ref-replaced")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out)


def _keys_the_model_converts(std: Path, names: list[str], trust_remote_code: bool) -> set[str]:
    """Tensor names that one of the model's own weight converters takes at load (e.g. per-expert MoE weights
    fused into one parameter): they stay in their standalone form, since a load matches one converter per key."""
    import tempfile

    from transformers.core_model_loading import dot_natural_key

    from tpde_hf.conversion.selection import _build_meta_model
    from tpde_hf.loading.ops import KeyMap

    config = json.loads((std / "config.json").read_text())
    config.pop("quantization_config", None)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(json.dumps(config))
        _, _, model = _build_meta_model(Path(tmp), trust_remote_code)
    keymap = KeyMap(model)
    return {k for k in sorted(names, key=dot_natural_key) if keymap.resolve(k).pattern is not None}


def _recode(std: Path, stage: Path, ref: ResolvedReference, trust_remote_code: bool = False) -> dict:
    """Write ``stage``: ``std`` (a verified tpde repo) with every tensor the reference codes smaller replaced."""

    from tpde_hf.integrity import add_repo_checksums

    tuned = ReferenceReader(std, str(std))  # decodes the standalone form: the (cast) fine-tune, bit for bit
    base = ref.reader()
    groups = _stored_groups(list(tuned._where))
    fused = _keys_the_model_converts(std, list(groups), trust_remote_code)
    out_tensors: dict[str, torch.Tensor] = {}
    used: list[list[str]] = []
    per_tensor: dict[str, dict] = {}
    totals = {"weights": 0, "source_bytes": 0, "stored_bytes": 0}
    for name, keys in sorted(groups.items()):
        stored = {k: tuned._read(k) for k in keys}
        stored_cost = sum(entry_cost(k, t.numel() * t.element_size()) for k, t in stored.items())
        choice, parts = "standalone" if len(keys) > 1 else "dense", None
        dense = tuned.get(name) if name in tuned else None
        if dense is not None and name in base and ".tpde_expert" not in keys[0] and name not in fused:
            ref_t = base.get(name)
            if tuple(ref_t.shape) == tuple(dense.shape):
                found = best_reference_coding(name, dense, ref_t, len(used))
                if found is not None:
                    cost = sum(entry_cost(stored_key(name, found[0], p), t.numel() * t.element_size())
                               for p, t in found[1].items())
                    if cost < stored_cost:
                        choice, parts = found
                        used.append([name, tensor_digest(ref_t)])
                        _check_decode(name, choice, parts, ref_t, dense)
        if parts is None:
            out_tensors.update(stored)
            nbytes = sum(t.numel() * t.element_size() for t in stored.values())
        else:
            out_tensors.update({stored_key(name, choice, p): t for p, t in parts.items()})
            nbytes = sum(t.numel() * t.element_size() for t in parts.values())
        if dense is not None:
            per_tensor[name] = {"stored_as": choice, "numel": dense.numel(), "bytes": nbytes,
                                "source_bytes": dense.numel() * dense.element_size()}
            totals["weights"] += dense.numel()
            totals["source_bytes"] += dense.numel() * dense.element_size()
        totals["stored_bytes"] += nbytes
    stage.mkdir(parents=True)
    _write_shards(out_tensors, stage)
    for f in std.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("model.safetensors.index.json",):
            shutil.copy2(f, stage / f.name)
        elif f.is_dir():
            shutil.copytree(f, stage / f.name)
    info = {"model": ref.repo_id or str(ref.folder), "revision": ref.revision, "commit": ref.commit,
            "checksum_algo": "xxh3_64", "tensors": used}
    _write_config(stage, info)
    add_repo_checksums(stage)
    counts: dict[str, int] = {}
    for v in per_tensor.values():
        counts[v["stored_as"]] = counts.get(v["stored_as"], 0) + 1
    summary = {"reference": {**{k: v for k, v in info.items() if k != "tensors"}, "tensors_used": len(used),
                             "stored_as": counts, **totals,
                             "bits_per_weight": 8 * totals["stored_bytes"] / max(totals["weights"], 1)},
               "tensors": per_tensor}
    _update_report(stage, summary)
    _update_card(stage, ref, summary)
    return summary


def _check_decode(name: str, codec: str, parts: dict[str, torch.Tensor], ref_t: torch.Tensor,
                  dense: torch.Tensor) -> None:
    got = TENSOR_CODECS.get(codec).decode(parts, CodecContext(name, ref_t))
    a = got.contiguous().view(-1).view(torch.uint8)
    b = dense.contiguous().view(-1).view(torch.uint8)
    if got.dtype != dense.dtype or not torch.equal(a, b):
        raise VerificationError(f"{name}: decoding its {codec} coding did not rebuild the fine-tune's bits")


def _write_shards(tensors: dict[str, torch.Tensor], folder: Path) -> None:
    """One ``model.safetensors``, or shards of at most ``SHARD_BYTES`` with an index (transformers' layout)."""
    from safetensors.torch import save_file
    from transformers.core_model_loading import dot_natural_key

    names = sorted(tensors, key=dot_natural_key)
    shards: list[list[str]] = [[]]
    size = 0
    for k in names:
        n = tensors[k].numel() * tensors[k].element_size()
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file({k: tensors[k].contiguous() for k in names}, str(folder / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k].contiguous() for k in keys}, str(folder / fname), metadata=meta)
        weight_map.update({k: fname for k in keys})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")


def _write_config(stage: Path, info: dict) -> None:
    path = stage / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"][CONFIG_KEY] = info
    tmp = path.with_name("config.json.tmp")
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _update_report(stage: Path, summary: dict) -> None:
    from tpde_hf.format import CONVERSION_REPORT_NAME

    path = stage / CONVERSION_REPORT_NAME
    report = json.loads(path.read_text()) if path.is_file() else {}
    report["reference"] = summary["reference"]
    report["reference_tensors"] = summary["tensors"]
    report["output_file_bytes"] = sum(p.stat().st_size for p in stage.rglob("*") if p.is_file())
    path.write_text(json.dumps(report, indent=1) + "\n")


def card_section(base_model: str | None) -> str:
    """The card's paragraph on how a delta repo is stored and loaded (also used when ``tpde push`` re-renders it)."""
    where = f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else "its base model"
    return (
        "\n\n## Stored as a delta against its base model\n\n"
        f"This fine-tune is stored as exact deltas against {where}, at the commit recorded in `config.json` "
        "(`quantization_config.reference`). `from_pretrained` fetches that reference through the Hugging Face cache "
        "(shared by every fine-tune of it), checks every reference tensor it uses against the xxh3 checksum recorded "
        "there, and rebuilds every weight bit for bit. Offline (`HF_HUB_OFFLINE=1`) works once the reference is "
        "cached; a missing or different reference is an error, never a wrong model.\n")


def _update_card(stage: Path, ref: ResolvedReference, summary: dict) -> None:
    """``base_model`` = the reference (a Hub id; a local path is never published), ``base_model_relation: finetune``."""
    from huggingface_hub import ModelCard

    from tpde_hf.conversion.card import render_card
    from tpde_hf.conversion.report import ConversionReport
    from tpde_hf.format import CONVERSION_REPORT_NAME

    path = stage / "README.md"
    if not path.is_file():
        return
    meta = ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
    if ref.repo_id:
        meta.update(base_model=ref.repo_id, base_model_relation="finetune")
        report = ConversionReport.from_dict(json.loads((stage / CONVERSION_REPORT_NAME).read_text()))
        render_card(report, source_meta=meta, base_model=ref.repo_id).save(path)
        return
    card = ModelCard.load(path, ignore_metadata_errors=True)
    card.data.base_model = None  # a local path is never published; the standalone card may name the source
    card.data.base_model_relation = None
    card.text += card_section(None)
    card.save(path)


def stored_codecs(keys: list[str]) -> dict[str, str]:
    """Tensor name -> reference codec, for the stored keys of a repo (non-reference codecs left out)."""
    import tpde_hf.reference as refpkg

    return {k: g.codec for k, g in group_coded_keys(keys).items() if g.codec in refpkg.CODEC_NAMES}


__all__ = ["ConversionError", "best_reference_coding", "convert_with_reference", "stored_codecs"]
