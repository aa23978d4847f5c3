"""What a base storage costs at load: the same model converted in each on-disk layout, loaded in every mode.

The bundled MiniLM (its fp32 weights cast to bf16 at conversion, ``--dtype bfloat16``; or fp32 with
``--dtype float32``) is converted once per layout: the resident layout (the default), ``storage="resident"``
(the same bytes under storage keys: the cost of the storage path itself) and every other registered storage
(``narrow-rans`` where :mod:`tpde_hf.codec.storage` provides it). Each repo is then loaded with
``from_pretrained`` in ``dequantize``, ``lossless`` and ``base`` mode, best of ``--repeats`` (the page cache
warm), and its converted weights' bytes on disk are counted. Every load is checked: ``dequantize`` bit for bit
against the cast source. The overhead of a storage is its dequantize load time over the resident layout's,
measured in the same run; ``decode_s`` times the decode alone (every converted weight from its stored parts,
in memory, no transformers, one weight after another, each on all cores), which separates the storage's codec
from the load machinery; ``decode_workers_s`` (storage-laid repos) decodes them as a ``dequantize`` load does:
whole weights on the load's worker threads, read from the files (:mod:`tpde_hf.loading.storage_prefetch`).

Example::

    python benchmarks/bench_storage_load.py --repeats 5    # -> benchmarks/results/storage_load.json
    python benchmarks/bench_storage_load.py --repeats 7 --out benchmarks/results/storage_load_s5.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import transformers

import tpde_hf
from tpde_hf.codec.registry import BASE_STORAGE
from tpde_hf.conversion import convert
from tpde_hf.examples import example_path

RESULTS = Path(__file__).parent / "results" / "storage_load.json"


def _layouts() -> list[str | None]:
    try:
        import tpde_hf.codec.storage  # noqa: F401  (registers the built-in storages)
    except ModuleNotFoundError:
        pass
    import tpde_hf.codec.storage_resident  # noqa: F401

    return [None, "resident", *[n for n in BASE_STORAGE.names() if n != "resident" and not n.startswith("test-")]]


def _converted_bytes(repo: Path) -> tuple[int, int]:
    """(bytes of the converted weights' stored parts, their element count) from the repo's own files."""
    from safetensors import safe_open

    manifest = json.loads((repo / "tpde_manifest.json").read_text())["tensors"]
    numel = sum(int(torch.tensor(e["shape"]).prod()) for e in manifest.values() if e["encoded"])
    total = 0
    for f in repo.glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            for k in fh.keys():
                if k not in manifest:  # a part of a converted weight
                    sl = fh.get_slice(k)
                    total += int(torch.tensor(sl.get_shape()).prod()) * {"U8": 1, "I8": 1, "F16": 2, "BF16": 2,
                                                                        "I32": 4, "F32": 4, "I64": 8}[sl.get_dtype()]
    return total, numel


def _decode_all(repo: Path) -> float:
    """Seconds to decode every converted weight of ``repo`` from its stored parts (no transformers), in memory."""
    from safetensors.torch import load_file

    from tpde_hf.codec import EncodedTensor, decode_tensors
    from tpde_hf.format import encoded_prefixes
    from tpde_hf.storage_format import decode_weight, storage_weights

    sd = {k: v for f in sorted(repo.glob("*.safetensors")) for k, v in load_file(f).items()}
    stored = storage_weights(sd)
    t = time.perf_counter()
    for w in stored.values():
        decode_weight(w.name, w.storage, {part: sd[k] for part, k in w.parts.items()})
    decode_tensors([EncodedTensor.from_state_dict(sd, p) for p in encoded_prefixes(sd)])
    return time.perf_counter() - t


def _decode_pool(repo: Path) -> float | None:
    """Seconds to decode every storage-laid weight of ``repo`` the way a ``dequantize`` load does: whole weights
    on the load's worker threads (:mod:`tpde_hf.loading.storage_prefetch`), from the files; None without such
    weights."""
    from safetensors import safe_open

    from tpde_hf.loading.storage_prefetch import StoragePrefetch, content_key
    from tpde_hf.storage_format import storage_weights

    files = sorted(str(f) for f in repo.glob("*.safetensors"))
    keys = []
    for f in files:
        with safe_open(f, "pt") as fh:
            for w in storage_weights(list(fh.keys())).values():
                keys.append(content_key("weight", w.storage, {p: fh.get_tensor(k) for p, k in w.parts.items()}))
    if not keys:
        return None
    t = time.perf_counter()
    pf = StoragePrefetch(files, "dequantize")
    try:
        if not all(pf.take(k)[0] for k in keys):
            raise RuntimeError("a weight was not decoded by the workers")
        return time.perf_counter() - t
    finally:
        pf.close()


def _uptime() -> str:
    """``uptime``'s line (the load averages of the shared machine), or "" where there is none."""
    import subprocess

    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _load(repo: Path, mode: str, dtype: torch.dtype) -> tuple[float, torch.nn.Module]:
    t = time.perf_counter()
    model = transformers.AutoModel.from_pretrained(repo, dtype=dtype, quantization_config=tpde_hf.TpdeConfig(mode=mode))
    return time.perf_counter() - t, model


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    transformers.logging.set_verbosity_error()
    dtype = getattr(torch, args.dtype)
    load_start, uptime_start = os.getloadavg(), _uptime()
    src = Path(example_path("minilm"))
    ref = transformers.AutoModel.from_pretrained(src, dtype=dtype).state_dict()
    rows, repos = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for layout in _layouts():
            repo = Path(tmp) / (layout or "default")
            t = time.perf_counter()
            convert(src, repo, storage=layout, dtype=args.dtype)
            convert_s = time.perf_counter() - t
            nbytes, numel = _converted_bytes(repo)
            rows.append({"layout": layout or "resident layout (default)", "converted_weights": numel,
                         "disk_bits_per_weight": 8 * nbytes / numel, "convert_s": convert_s})
            repos.append(repo)
        # rounds over every layout and mode, so that a change in the shared machine's load hits them alike
        for _ in range(args.repeats):
            for row, repo in zip(rows, repos, strict=True):
                for mode in ("dequantize", "lossless", "base"):
                    seconds, model = _load(repo, mode, dtype)
                    row[f"{mode}_load_s"] = min(seconds, row.get(f"{mode}_load_s", float("inf")))
                    if mode == "dequantize" and "dequantize_bit_exact" not in row:  # bit for bit against the source
                        got = model.state_dict()
                        row["dequantize_bit_exact"] = all(torch.equal(got[k].view(torch.uint8),
                                                                      v.contiguous().view(torch.uint8))
                                                          for k, v in ref.items())
                    del model
                row["decode_s"] = min(_decode_all(repo), row.get("decode_s", float("inf")))
                pool = _decode_pool(repo)
                if pool is not None:
                    row["decode_workers_s"] = min(pool, row.get("decode_workers_s", float("inf")))
        for row in rows:
            print(json.dumps(row))
    base = rows[0]["dequantize_load_s"]
    for r in rows:
        r["dequantize_overhead_vs_resident_layout"] = r["dequantize_load_s"] / base - 1
        r["decode_overhead_vs_resident_layout"] = r["decode_s"] / rows[0]["decode_s"] - 1
    result = {
        "benchmark": "storage_load",
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, shared VM",
        "model": f"MiniLM (all-MiniLM-L6-v2), fp32 source cast to {args.dtype} at conversion",
        "repeats": args.repeats, "rows": rows,
        "load_average_start_end": [list(load_start), list(os.getloadavg())],
        "uptime_start_end": [uptime_start, _uptime()],
        "note": "load times are from_pretrained wall clock, best of repeats, page cache warm; storage-laid weights "
                "are decoded by the load's worker threads from the quantizer's weight conversions on "
                "(tpde_hf.loading.storage_prefetch)",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
