"""Fine-tunes stored as exact deltas against their base: tpde vs BitX, zstd on the XOR, FM-Delta-style, ZipNN.

For each (base, fine-tune) pair made by ``benchmarks/make_finetunes.py`` (real training on real text), in one
run on one machine:

* ``tpde-reference``: ``tpde convert FT OUT --reference BASE`` (per tensor the smallest of ref-same, ref-ord,
  the standalone tpde form and dense); bytes = every tensor stored in OUT's safetensors (headers excluded, as
  for the others);
* ``tpde-standalone``: ``tpde convert FT OUT`` (no reference: 4-bit base + delta on linear weights);
* ``bitx-zstd{3,19}``: BitX as its paper describes it: XOR each fine-tuned weight with the base's, split the
  exponent bits from the sign + mantissa bits, zstd each stream (streams of the whole model);
* ``xor-zstd{3,19}``: zstd on the XOR's bytes;
* ``fmdelta-style``: FM-Delta's idea: floats to integers (the ordinal map), integer delta, the delta's
  magnitude class entropy-coded (one static rANS table, no context) plus raw bits: tpde's ``ref-ord`` pinned to
  a single context, so the gap to ``tpde-reference`` is what the context buys;
* ``zipnn``: ZipNN on the fine-tune alone (peer venv, subprocess, as ``bench_peers.py`` runs it).

It also times the rebuild (decode of every reference-coded tensor, numba threads = cores) and
``from_pretrained`` of the delta repo (reference on local disk, page-cached) against the dense fine-tune.
``--part bits`` (sizes; any priority) and ``--part timing`` (run it alone, under the shared bench lock; it reuses
the repos the bits part wrote and adds its figures to the same JSON) split the two.

``ref-sparse`` (gap-coded positions + values) is one of the per-tensor choices; the ``ref_sparse`` section lists
the tensors of each real pair where it won, with the ``ref-ord`` size of the same tensor, and a *synthetic*
section (labelled so) codes sparse changes made here on a real base tensor: rows of a few tokens (an untied
embedding after training on a small vocabulary), and a few scattered entries.

Example::

    python benchmarks/bench_reference.py --pairs minilm smollm2 --part bits
    flock /tmp/lead/bench.lock python benchmarks/bench_reference.py --pairs minilm smollm2 --part timing
    # the same, with an earlier tpde_hf package (a copy of the tree) timed in the same loop as delta_before
    flock /tmp/lead/bench.lock python benchmarks/bench_reference.py --pairs smollm2 --part timing --before /tmp/old
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

HERE = Path(__file__).resolve().parent
PAIRS = HERE / "results" / "tmp" / "reference"
OUT = HERE / "results" / "reference.json"


def _bits(t: torch.Tensor) -> np.ndarray:
    view = {2: torch.int16, 4: torch.int32}[t.element_size()]
    return t.contiguous().view(-1).view(view).numpy()


def bitx_streams(base: dict, tuned: dict) -> tuple[bytes, bytes, bytes]:
    """(exponent stream, sign+mantissa stream, raw XOR bytes) of the whole model, tensor by tensor."""
    exps, sms, xors = [], [], []
    for k, t in tuned.items():
        b = base[k]
        if not t.is_floating_point() or b.shape != t.shape or b.dtype != t.dtype:
            continue
        x = (_bits(t) ^ _bits(b)).astype(np.uint16 if t.element_size() == 2 else np.uint32)
        if t.dtype == torch.bfloat16:
            exp, sm = ((x >> 7) & 0xFF).astype(np.uint8), ((((x >> 15) & 1) << 7) | (x & 0x7F)).astype(np.uint8)
            exps.append(exp.tobytes())
            sms.append(sm.tobytes())
        else:  # fp16 / fp32: exponent byte stream, and the remaining bits as bytes
            raise SystemExit("bench_reference: the pairs are bf16")
        xors.append(x.tobytes())
    return b"".join(exps), b"".join(sms), b"".join(xors)


def zstd_size(data: bytes, level: int) -> int:
    return len(zstandard.ZstdCompressor(level=level, threads=-1).compress(data))


def fmdelta_style(base: dict, tuned: dict) -> int:
    """Bytes of the single-context integer-delta coding (see the module docstring) over every tensor."""
    import tpde_hf.reference.codec as C
    from tpde_hf.codec.registry import CodecContext

    total = 0
    for k, t in tuned.items():
        if not t.is_floating_point() or base[k].shape != t.shape:
            total += t.numel() * t.element_size()
            continue
        parts = C.RefOrd().encode(t, CodecContext(k, base[k], {"configs": ((1, 1),)}))
        total += parts["blob"].numel() if parts is not None else t.numel() * t.element_size()
    return total


def stored_tensor_bytes(folder: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                s = fh.get_slice(k)
                n += int(np.prod(s.get_shape(), dtype=np.int64)) * {"BF16": 2, "F16": 2, "F32": 4, "I64": 8,
                                                                     "I32": 4, "U8": 1, "I8": 1, "I16": 2,
                                                                     "BOOL": 1}[s.get_dtype()]
    return n


def rebuild_speed(out: Path, base_dir: Path, repeat: int = 3) -> dict:
    """Decode every reference-coded tensor of ``out`` (reference tensors already in memory): MB/s of output."""
    from safetensors import safe_open

    import tpde_hf.reference.codec as C
    from tpde_hf.codec.registry import CodecContext, group_coded_keys
    from tpde_hf.reference.resolve import ReferenceReader

    ref = ReferenceReader(base_dir, str(base_dir))
    items = []
    with safe_open(str(out / "model.safetensors"), framework="pt") as fh:
        for name, g in group_coded_keys(list(fh.keys())).items():
            items.append((name, g.codec, fh.get_tensor(g.parts["blob"]), ref.get(name)))
    from concurrent.futures import ThreadPoolExecutor

    from tpde_hf.reference.prefetch import default_workers

    def one(item: tuple, serial: bool) -> int:
        name, codec, blob, r = item
        d = C.TENSOR_CODECS.get(codec).decode({"blob": blob}, CodecContext(name, r, {"serial": serial}))
        return d.numel() * d.element_size()

    workers = default_workers()

    def batch() -> int:
        import threading

        from tpde_hf.reference.batch import BatchDecode

        b = BatchDecode()
        threads = [threading.Thread(target=b.work) for _ in range(workers)]
        for t in threads:
            t.start()
        idx = b.add([C.prepare_ord(blob, r, name) for name, codec, blob, r in items if codec == "ref-ord"])
        b.close()
        nbytes = sum(d.numel() * d.element_size() for d in (b.result(i) for i in idx))
        for t in threads:
            t.join()
        return nbytes + sum(one(it, True) for it in items if it[1] != "ref-ord")

    modes = {"job list over batches of chunks (the load path: tpde_hf.reference.batch)": batch,
             "pool over tensors (the previous load path)":
             lambda: sum(ThreadPoolExecutor(workers).map(lambda it: one(it, True), items)),
             "one tensor at a time, numba threads inside": lambda: sum(one(it, False) for it in items)}
    res: dict = {"threads": workers, "note": "wall-clock MB/s of decoded output on a machine shared with other "
                 "jobs (see uptime); MB per CPU-second is what one core does when it runs"}
    for label, run in modes.items():
        times, cpu, nbytes = [], [], 0
        for _ in range(repeat + 1):  # the first run compiles / warms up
            t0, c0 = time.perf_counter(), time.process_time()
            nbytes = run()
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        res[label] = {"decoded_bytes": nbytes, "seconds_runs": times[1:], "cpu_seconds_runs": cpu[1:],
                      "MB_per_s_best": nbytes / min(times[1:]) / 1e6,
                      "MB_per_s_median": nbytes / statistics.median(times[1:]) / 1e6,
                      "MB_per_cpu_second_best": nbytes / min(cpu[1:]) / 1e6}
    return res


def compile_package(root: Path) -> str:
    """Byte-compile the ``tpde_hf`` package under ``root`` (its ``__pycache__``), as ``pip install`` does.

    Why: this environment sets ``PYTHONDONTWRITEBYTECODE=1`` and the source tree has no ``.pyc``, so every timed
    process would compile ``tpde_hf`` from source; a delta load imports ~4,400 more lines of it than the dense
    load (the reference decode path), which cost it 0.1-0.35 s per load (2026-12-07) that an installed package
    never pays. Python still reads valid ``.pyc`` files under that variable, and checks them against the source.
    """
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(root / "tpde_hf")], check=True,
                   capture_output=True)
    return f"{root / 'tpde_hf'} byte-compiled (compileall) before timing"


def package_root() -> Path:
    """The folder holding the ``tpde_hf`` package the timed children import."""
    import importlib.util

    return Path(importlib.util.find_spec("tpde_hf").origin).parent.parent


def load_times(out: Path, dense: Path, auto: str, repeat: int = 3, no_early: bool = True,
               before: Path | None = None, bytecode: bool = True) -> dict:
    """``from_pretrained`` wall time, alternating the delta repo and the dense fine-tune, in fresh processes.

    ``delta``: the default (the decode starts when ``from_pretrained`` reads ``config.json``:
    :mod:`tpde_hf.reference.early`); ``no_early``: also ``delta_no_early``, the same with ``TPDE_REFERENCE_EARLY=0``
    (the decode starts at the quantizer). ``before``: a folder holding an earlier ``tpde_hf`` package (e.g. ``git
    archive HEAD tpde_hf``), loaded as ``delta_before`` with its own default (``TPDE_REFERENCE_EARLY`` unset) in the
    same loop, so that old and new code are compared under the same machine load. ``bytecode``: byte-compile both
    packages first (:func:`compile_package`), so that no child compiles ``tpde_hf`` from source."""
    code = ("import sys, time, torch; t0 = time.perf_counter(); import tpde_hf, transformers; "
            f"m = transformers.{auto}.from_pretrained(sys.argv[1]); print(time.perf_counter() - t0); "
            "import gc; print(gc.get_stats()[2]['collections'])")  # full GC passes: ~0.2 s each at this heap size
    env = {k: v for k, v in os.environ.items() if k != "TPDE_REFERENCE_EARLY"}  # each variant: its package's default
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1")

    def importing(root: Path) -> dict:
        """Run a child so that it imports the ``tpde_hf`` under ``root``: ``python -c`` puts its working folder
        first on ``sys.path``, ahead of ``PYTHONPATH`` (run from the repo, a ``--before`` copy was not the code
        timed until 2026-12-07 21:30 UTC), so the child runs in ``root``, with ``root`` first on PYTHONPATH too."""
        path = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        return {"env": {**env, "PYTHONPATH": path}, "cwd": str(root)}

    here = importing(package_root())
    variants = [("delta", out, here), ("dense", dense, here)]
    if no_early:
        variants.append(("delta_no_early", out, {**here, "env": {**here["env"], "TPDE_REFERENCE_EARLY": "0"}}))
    if before is not None:
        variants.append(("delta_before", out, importing(before)))
        for _ in range(2):  # its numba cache (another path): compiled here, not timed (twice: the first run's
            # daemon warm-up thread may end with the process before it has written its kernels to the cache)
            subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True,
                           **importing(before))
    which = "import tpde_hf; print(tpde_hf.__file__)"
    packages = {label: subprocess.run([sys.executable, "-c", which], capture_output=True, text=True, check=True,
                                      **how).stdout.strip() for label, _, how in variants}
    compiled = [compile_package(r) for r in ([package_root()] + ([before] if before else []))] if bytecode else []
    runs: dict[str, list[float]] = {v[0]: [] for v in variants}
    full_gc: dict[str, list[int]] = {v[0]: [] for v in variants}
    for _ in range(repeat):
        for label, path, how in variants:
            p = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True,
                               **how)
            lines = p.stdout.strip().splitlines()
            runs[label].append(float(lines[-2]))
            full_gc[label].append(int(lines[-1]))
    med = {k: statistics.median(v) for k, v in runs.items()}
    res = {"runs_s": runs, "median_s": med, "delta_over_dense": med["delta"] / med["dense"], "packages": packages,
           "variants": {"delta": "this tree's default: the early start (decode from config.json)",
                        "dense": "the dense fine-tune, same code",
                        "delta_no_early": "this tree with TPDE_REFERENCE_EARLY=0 (decode from the quantizer)",
                        "delta_before": f"the tpde_hf package in {before}, its own default (TPDE_REFERENCE_EARLY "
                                        "unset)"},
           "full_gc_passes": full_gc, "full_gc_note": "CPython generation-2 collections per process (imports "
                                                     "included); each walks the whole heap (~0.1-0.27 s at its end)",
           "note": "fresh process per run, imports included; reference and repos on local disk, page-cached; "
                   "variants alternated in one loop",
           "bytecode": compiled or "tpde_hf not byte-compiled first (--no-compile): children use whatever .pyc "
                                   "exist, else compile it from source",
           "PYTHONDONTWRITEBYTECODE": os.environ.get("PYTHONDONTWRITEBYTECODE")}
    if no_early:
        res["delta_no_early_over_dense"] = med["delta_no_early"] / med["dense"]
    if before is not None:
        res["delta_before_over_dense"] = med["delta_before"] / med["dense"]
    else:
        del res["variants"]["delta_before"]
    if not no_early:
        del res["variants"]["delta_no_early"]
    return res


def codec_bytes(codec: str, t: torch.Tensor, ref: torch.Tensor) -> int:
    import tpde_hf.reference.sparse  # noqa: F401
    from tpde_hf.codec.registry import TENSOR_CODECS, CodecContext

    return int(TENSOR_CODECS.get(codec).encode(t, CodecContext("w", ref, {"force": True}))["blob"].numel())


def sparse_wins(summary: dict, base: dict, tuned: dict) -> list[dict]:
    """The real pair's tensors stored as ref-sparse, with the ref-ord bytes of the same tensor."""
    rows = []
    for k, v in summary["tensors"].items():
        if v["stored_as"] == "ref-sparse":
            changed = float((_bits(base[k]) != _bits(tuned[k])).mean())
            rows.append({"tensor": k, "numel": v["numel"], "fraction_changed": changed, "ref_sparse_bytes": v["bytes"],
                         "ref_ord_bytes": codec_bytes("ref-ord", tuned[k], base[k])})
    return rows


def synthetic_sparse(base: dict, seed: int = 0) -> list[dict]:
    """SYNTHETIC sparse changes on the pair's real base embedding: ref-sparse vs ref-ord vs BitX on that tensor."""
    name = next(k for k in base if "embed" in k and base[k].dim() == 2)
    ref = base[name]
    g = torch.Generator().manual_seed(seed)
    out = []
    for label, frac_rows, frac_entries in (("1% of rows (untied embedding, small vocabulary seen)", 0.01, None),
                                           ("0.1% scattered entries", None, 0.001)):
        t = ref.clone()
        step = (torch.randn(ref.shape, generator=g) * 1e-3).to(ref.dtype)
        if frac_rows:
            rows = torch.randperm(ref.shape[0], generator=g)[: max(1, int(frac_rows * ref.shape[0]))]
            t[rows] = (ref[rows].float() + step[rows].float()).to(ref.dtype)
        else:
            mask = torch.rand(ref.shape, generator=g) < frac_entries
            t[mask] = (ref[mask].float() + step[mask].float()).to(ref.dtype)
        exp, sm, _ = bitx_streams({name: ref}, {name: t})
        sizes = {"ref-sparse": codec_bytes("ref-sparse", t, ref), "ref-ord": codec_bytes("ref-ord", t, ref),
                 "bitx-zstd19": zstd_size(exp, 19) + zstd_size(sm, 19)}
        out.append({"synthetic": True, "tensor": name, "change": label, "numel": t.numel(),
                    "fraction_changed": float((_bits(t) != _bits(ref)).mean()), "bytes": sizes,
                    "bits_per_weight": {k: 8 * v / t.numel() for k, v in sizes.items()}})
    return out


def bench_pair(name: str, work: Path, with_zipnn: bool, load_repeat: int = 3) -> dict:
    from safetensors.torch import load_file

    from tpde_hf.reference.convert import convert_with_reference

    folder = PAIRS / name
    base_dir, ft_dir = folder / "base", folder / "finetune"
    base, tuned = load_file(base_dir / "model.safetensors"), load_file(ft_dir / "model.safetensors")
    n = sum(t.numel() for t in tuned.values())
    src_bytes = sum(t.numel() * t.element_size() for t in tuned.values())
    res: dict = {"weights": n, "source_bytes": src_bytes,
                 "recipe": json.loads((folder / "recipe.json").read_text())}
    sizes: dict[str, int] = {}
    timing: dict[str, float] = {}

    t0 = time.perf_counter()
    out = work / f"{name}-ref"
    shutil.rmtree(out, ignore_errors=True)
    std = work / f"{name}-std"
    summary = convert_with_reference(ft_dir, out, base_dir, workers=1, keep_standalone=std)
    timing["tpde-reference convert_s (standalone conversion included)"] = time.perf_counter() - t0
    sizes["tpde-reference"] = stored_tensor_bytes(out)
    res["tpde_reference_stored_as"] = summary["reference"]["stored_as"]
    res["ref_sparse"] = {"real_tensors_where_it_won": sparse_wins(summary, base, tuned),
                         "synthetic": synthetic_sparse(base)}
    res["tpde_reference_file_bytes"] = (out / "model.safetensors").stat().st_size
    sizes["tpde-standalone"] = stored_tensor_bytes(std)  # the same conversion, without the reference

    exp, sm, xor = bitx_streams(base, tuned)
    dense_rest = sum(t.numel() * t.element_size() for k, t in tuned.items() if not t.is_floating_point())
    for level in (3, 19):
        sizes[f"bitx-zstd{level}"] = zstd_size(exp, level) + zstd_size(sm, level) + dense_rest
        sizes[f"xor-zstd{level}"] = zstd_size(xor, level) + dense_rest
    t0 = time.perf_counter()
    sizes["fmdelta-style"] = fmdelta_style(base, tuned)
    timing["fmdelta-style encode_s"] = time.perf_counter() - t0

    if with_zipnn:
        sys.path.insert(0, str(HERE))
        from bench_peers import DEFAULT_PEERS_PYTHON, TOOLS, run_peer

        z = run_peer(TOOLS["zipnn"], ft_dir / "model.safetensors", work / f"{name}-zipnn", DEFAULT_PEERS_PYTHON,
                     repeat=1, budget_s=60, timeout_s=900)
        res["zipnn_status"] = z.get("status")
        if z.get("status") == "ok":
            sizes["zipnn"] = int(z["stored_bytes"])
            res["zipnn_version"] = z.get("version")
        else:
            res["zipnn_error"] = z.get("error")

    res["bytes"] = sizes
    res["bits_per_weight"] = {k: 8 * v / n for k, v in sizes.items()}
    bitx = min(sizes["bitx-zstd3"], sizes["bitx-zstd19"])
    res["tpde_reference_vs_best_bitx"] = sizes["tpde-reference"] / bitx
    res["goal_25pct_smaller_than_bitx"] = sizes["tpde-reference"] <= 0.75 * bitx
    res["timing"] = timing
    return res


def ref_ord_layouts(folder: Path) -> dict[str, int]:
    """How many ``ref-ord`` blobs of the repo are in each byte layout (header word 0)."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        for k in fh.keys():
            if k.endswith(".ref-ord.blob"):
                v = str(int(fh.get_slice(k)[:8].view(torch.int64)[0]))
                counts[v] = counts.get(v, 0) + 1
    return counts


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def time_pair(name: str, work: Path, load_repeat: int, before: Path | None = None, bytecode: bool = True) -> dict:
    """Rebuild speed and from_pretrained time of the delta repo the bits part wrote (run under the bench lock)."""
    folder = PAIRS / name
    out = work / f"{name}-ref"
    if not (out / "config.json").is_file():
        raise SystemExit(f"bench_reference: run --part bits for {name} first ({out} is missing)")
    res = {"uptime_start": uptime(), "date_utc": subprocess.run(["date", "-u"], capture_output=True,
                                                                text=True).stdout.strip()}
    res["ref_ord_layouts"] = ref_ord_layouts(out)
    res["rebuild"] = rebuild_speed(out, folder / "base")
    auto = "AutoModelForCausalLM" if name == "smollm2" else "AutoModel"
    res["load"] = load_times(out, folder / "finetune", auto, repeat=load_repeat, before=before, bytecode=bytecode)
    res["uptime_end"] = uptime()
    return res


class _AfterImport:
    """A ``sys.meta_path`` finder of the profile child: runs ``hooks[name](module)`` right after module ``name``
    executes, so that the child instruments transformers' and tpde-hf's modules without importing them early (an
    early import would move the model-code imports out of ``from_pretrained``, where the early start overlaps them)."""

    _tpde_profile = True

    def __init__(self, hooks: dict):
        self.hooks = hooks

    def find_spec(self, name: str, path: object = None, target: object = None) -> object:
        then = self.hooks.get(name)
        if then is None:
            return None
        from tpde_hf._autoregister import spec_then

        return spec_then(name, path, target, "_tpde_profile", then)


def profile_child(path: str, auto: str) -> dict:
    """One ``from_pretrained`` in this (fresh) process, as the timing part runs it (``import tpde_hf,
    transformers`` first, so the early start runs unless ``TPDE_REFERENCE_EARLY=0``), with a timeline: per event the
    wall time, the thread, its CPU time and the process CPU time. Events: the config read and the early start, the
    preparation, numba's cache load, each decode thread, the quantizer, adoption, the loading thread's waits for
    decoded tensors (each over 1 ms), the end of key imports, every full (generation 2) collection. Hooks wrap
    tpde-hf functions and mark imports only (no behaviour change); tpde-hf's reference modules (imported at
    ``config.json`` by the early start anyway, ~0.015 CPU-s) are imported before ``from_pretrained``."""
    import gc
    import threading

    t0 = time.perf_counter()
    marks: list[dict] = []
    collections: list[dict] = []  # CPython's cyclic GC: a full (generation 2) pass walks every object (~0.2 s here)
    gc_total = {0: 0.0, 1: 0.0, 2: 0.0}
    started: dict[int, float] = {}

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[threading.get_ident()] = time.perf_counter()
            return
        took = time.perf_counter() - started.pop(threading.get_ident(), t0)
        gc_total[info["generation"]] += took
        if info["generation"] == 2:
            collections.append({"at_s": time.perf_counter() - t0, "thread": threading.current_thread().name,
                                "seconds": took})

    gc.callbacks.append(on_gc)

    def mark(what: str, **extra: object) -> None:
        marks.append({"at_s": time.perf_counter() - t0, "what": what, "process_cpu_s": time.process_time(),
                      "thread": threading.current_thread().name, "thread_cpu_s": time.thread_time(), **extra})

    import transformers

    import tpde_hf  # noqa: F401

    mark("imports done")
    import tpde_hf.reference.batch as BD
    import tpde_hf.reference.early as E
    import tpde_hf.reference.fastload as FL
    import tpde_hf.reference.prefetch as P

    acc = {"decode_jobs": 0, "decode_cpu_s": 0.0, "prepare_cpu_s": 0.0, "loading_thread_wait_s": 0.0, "takes": 0,
           "first_decode_start_s": None, "last_decode_end_s": 0.0, "first_take_s": None, "last_take_s": 0.0}
    lock = threading.Lock()

    def timed(owner: object, name: str, label: str, key: str | None = None) -> None:
        orig = getattr(owner, name)

        def wrapper(*a, **k):
            mark(label)
            c, w = time.thread_time(), time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                with lock:
                    if key == "decode":
                        acc["decode_jobs"] += 1
                        acc["decode_cpu_s"] += time.thread_time() - c
                        if acc["first_decode_start_s"] is None:
                            acc["first_decode_start_s"] = w - t0
                        acc["last_decode_end_s"] = max(acc["last_decode_end_s"], time.perf_counter() - t0)
                    elif key:
                        acc[key] += time.thread_time() - c
                mark(label + " end")

        setattr(owner, name, wrapper)

    def timed_take() -> None:
        orig = P.Prefetch.take

        def take(self, header):
            w = time.perf_counter()
            try:
                return orig(self, header)
            finally:
                end = time.perf_counter()
                with lock:
                    acc["takes"] += 1
                    acc["loading_thread_wait_s"] += end - w
                    acc["first_take_s"] = acc["first_take_s"] if acc["first_take_s"] is not None else w - t0
                    acc["last_take_s"] = end - t0
                if end - w > 1e-3:
                    mark("wait for a decoded tensor", seconds=end - w)

        P.Prefetch.take = take

    timed(E, "_start", "early start (config.json read)")
    timed(E, "adopt", "adopt the early prefetch")
    timed(P.Prefetch, "_blobs", "prefetch: read the blob headers")
    timed(P.Prefetch, "_prepare", "prefetch: prepare", "prepare_cpu_s")
    timed(BD.BatchDecode, "work", "decode thread", "decode")  # one call per decode thread: its whole share
    timed(FL, "_load", "numba cache load (fastload)")
    timed_take()

    def on_load_module(m: object) -> None:
        mark("imported tpde_hf.reference.load")
        timed(m, "_warm_kernels", "numba warm-up (background thread)")

    def on_quantizer(m: object) -> None:
        mark("imported tpde_hf.quantizer")
        timed(m.TpdeHfQuantizer, "__init__", "quantizer init")
        timed(m.TpdeHfQuantizer, "_process_model_before_weight_loading", "quantizer before weight loading")

    def on_modeling_utils(m: object) -> None:
        mark("imported transformers.modeling_utils")
        # transformers' quantizer point: marked for the dense load too, so the time after it compares
        timed(m, "get_hf_quantizer", "get_hf_quantizer")
        timed(m.PreTrainedModel, "_load_pretrained_model", "transformers: load the weights")

    hooks = {"tpde_hf.reference.load": on_load_module, "tpde_hf.quantizer": on_quantizer,
             "transformers.modeling_utils": on_modeling_utils}
    for name in ("transformers.generation.utils", "transformers.models.llama.modeling_llama",
                 "transformers.integrations.sdpa_attention", "transformers.core_model_loading"):
        hooks[name] = lambda m, name=name: mark(f"imported {name}")
    import sys as _sys

    _sys.meta_path.insert(0, _AfterImport(hooks))
    mark("from_pretrained start")
    getattr(transformers, auto).from_pretrained(path)
    mark("from_pretrained end")
    gc.callbacks.remove(on_gc)
    return {"marks": sorted(marks, key=lambda m: m["at_s"]), "decode": acc, "full_gc": collections,
            "gc_seconds_by_generation": gc_total,
            "early": os.environ.get("TPDE_REFERENCE_EARLY") != "0"}


def profile_load(out: Path, dense: Path, auto: str, repeat: int) -> dict:
    """:func:`profile_child` of the delta repo (early start, the default), of the delta repo without it
    (``TPDE_REFERENCE_EARLY=0``) and of the dense fine-tune, alternating, in fresh processes."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    compile_package(package_root())
    variants = [("delta", out, env), ("delta_no_early", out, {**env, "TPDE_REFERENCE_EARLY": "0"}),
                ("dense", dense, env)]
    runs: dict[str, list] = {v[0]: [] for v in variants}
    for _ in range(repeat):
        for label, path, run_env in variants:
            p = subprocess.run([sys.executable, __file__, "--profile-child", str(path), auto], capture_output=True,
                               text=True, env=run_env, check=True)
            runs[label].append(json.loads(p.stdout.strip().splitlines()[-1]))
    return {"runs": runs, "note": "one process per run; CPU figures from time.process_time / thread_time; delta: "
                                  "the default (early start), delta_no_early: TPDE_REFERENCE_EARLY=0"}


def summarize_profile(run: dict) -> list[str]:
    """The timeline of one :func:`profile_child` run as text lines (for reading; the JSON keeps every field)."""
    lines = []
    for m in run["marks"]:
        extra = f" ({m['seconds']:.4f} s)" if "seconds" in m else ""
        lines.append(f"{m['at_s']:7.3f}  {m['thread']:<22} cpu {m['thread_cpu_s']:6.3f} proc {m['process_cpu_s']:6.3f}"
                     f"  {m['what']}{extra}")
    for c in run["full_gc"]:
        lines.append(f"{c['at_s']:7.3f}  full GC pass on {c['thread']}: {c['seconds']:.3f} s")
    return lines


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--profile-child":
        print(json.dumps(profile_child(sys.argv[2], sys.argv[3])))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", nargs="+", default=["minilm", "smollm2"])
    ap.add_argument("--no-zipnn", action="store_true")
    ap.add_argument("--load-repeat", type=int, default=3, help="from_pretrained runs per repo (fresh processes)")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/reference_<pairs>.json")
    ap.add_argument("--part", choices=["bits", "timing", "profile", "all"], default="all",
                    help="bits: sizes (any priority); timing: rebuild + load of the repos bits wrote (bench lock); "
                         "profile: per-phase time stamps of the loads (bench lock; not part of 'all')")
    ap.add_argument("--before", default=None, help="timing: a folder with an earlier tpde_hf package, timed as "
                                                    "delta_before in the same loop")
    ap.add_argument("--no-compile", action="store_true", help="timing: do not byte-compile tpde_hf first (the "
                                                                   "children then use whatever .pyc exist)")
    a = ap.parse_args()
    work = PAIRS / "bench"
    work.mkdir(parents=True, exist_ok=True)
    out = Path(a.out) if a.out else OUT.with_name(f"reference_{'_'.join(a.pairs)}.json")
    machine = f"{os.cpu_count()} CPU cores, shared with other jobs (load varies); torch {torch.__version__}"
    result = {"date_utc": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
              "machine": machine, "pairs": {}}
    if a.part == "timing" and out.is_file():
        result = json.loads(out.read_text())
    for name in a.pairs:
        if not (PAIRS / name / "recipe.json").is_file():
            print(f"skip {name}: run benchmarks/make_finetunes.py --pair {name} first")
            continue
        if a.part in ("bits", "all"):
            result["pairs"][name] = bench_pair(name, work, not a.no_zipnn, a.load_repeat)
            print(json.dumps({name: result["pairs"][name]["bits_per_weight"]}, indent=1), flush=True)
        if a.part == "profile":
            auto = "AutoModelForCausalLM" if name == "smollm2" else "AutoModel"
            result["pairs"].setdefault(name, {})["profile"] = {
                "uptime_start": uptime(), **profile_load(work / f"{name}-ref", PAIRS / name / "finetune", auto,
                                                         a.load_repeat), "uptime_end": uptime()}
        if a.part in ("timing", "all"):
            result["pairs"].setdefault(name, {})["timing_part"] = time_pair(name, work, a.load_repeat,
                                                                    Path(a.before) if a.before else None,
                                                                    not a.no_compile)
            print(json.dumps({name: result["pairs"][name]["timing_part"]}, indent=1, default=str), flush=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
