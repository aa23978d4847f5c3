"""Training checkpoints as exact temporal deltas (issue 21): a real CPU training run, same-run baselines.

Recipe (recorded in the JSON):

* model: all-MiniLM-L6-v2 (``tpde_hf.examples.example_path("minilm")``, fp32) as ``BertForMaskedLM``
  (the MLM head starts untrained; its decoder is tied to the word embeddings);
* text: the METADATA / README files of the packages installed in ``.venv`` (real English prose and
  Markdown, about 1 MB), tokenized, cut into sequences of ``--seq`` tokens; MLM masking 15%;
* Trainer, AdamW (torch), fp32, lr 5e-5 constant, weight decay 0.01, batch ``--batch``, seed 0,
  ``--steps`` steps, a checkpoint every ``--save-steps`` steps (``model.safetensors``, ``optimizer.pt``,
  ``scheduler.pt``, ``rng_state.pth``, ``trainer_state.json``, ...);
* run 1, ``plain``: Trainer alone. Run 2, ``tpde``: the same run (same seed, same initial weights) with
  ``TpdeCheckpointCallback(keyframe_every=8)``. Deterministic CPU training makes the two runs write the
  same checkpoints, so run 2's packed checkpoints are restored and compared byte for byte with run 1's
  files: the end-to-end exactness check on real data.

Measured:

* bits per value of weights (``model.safetensors`` float tensors), ``exp_avg``, ``exp_avg_sq`` and of the
  whole checkpoint folder, for every checkpoint (the first is a keyframe, the rest deltas), against the
  raw files, zstd (level 3, each file / each kind's bytes) and ZipNN (``.venv-peers``, in a subprocess,
  on each kind's bytes and on whole files) on run 1's files;
* mean and median step time of both runs over the whole run (checkpoint steps included), so the
  callback's background packing shows up as the difference, and the step after each save (where a
  wait for the previous pack lands);
* restore speed: ``restore(checkpoint, out=...)`` of the last checkpoint (its whole chain decoded from
  the keyframe) and of one delta alone given its decoded parent, in MB of checkpoint files per second.

NVIDIA's nvCOMP checkpoint post (21-29% smaller whole checkpoints, no delta) is the anchor.

Run: ``python benchmarks/bench_checkpoints.py [--steps 60 --save-steps 20 --batch 4 --seq 64]``
-> ``benchmarks/results/checkpoints.json``. Speeds depend on the machine and its load (recorded).
A long run in parts: ``--train-only --steps 300 --work W`` (the plain run, checkpoints kept in ``W/plain``),
``--sizes-from W/plain --work W2`` (sizes of every checkpoint, packed as the callback would, baselines,
exactness), ``--restore-only W2/packed`` (restore timing of every chain).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import xxhash
import zstandard

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("weights", "exp_avg", "exp_avg_sq")


def _text(tok, seq: int) -> list[dict]:
    files = sorted(glob.glob(str(ROOT / ".venv/lib/python*/site-packages/*.dist-info/METADATA")))
    files += sorted(glob.glob(str(ROOT / ".venv/lib/python*/site-packages/*/README.md")))
    text = "\n".join(open(f, errors="ignore").read() for f in files if os.path.getsize(f) > 4000)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    step = seq - 2
    return [{"input_ids": [tok.cls_token_id] + ids[i:i + step] + [tok.sep_token_id]}
            for i in range(0, len(ids) - step, step)]


class _StepClock:
    """Wall time at every step end (a TrainerCallback built lazily: transformers is imported late)."""

    def __new__(cls):
        from transformers import TrainerCallback

        class Clock(TrainerCallback):
            def __init__(self):
                self.t: list[float] = []

            def on_train_begin(self, *a, **k):
                self.t.append(time.perf_counter())

            def on_step_end(self, *a, **k):
                self.t.append(time.perf_counter())

            def on_train_end(self, *a, **k):
                self.t.append(time.perf_counter())  # includes waiting for the last pack

        return Clock()


def _train(out: Path, init: dict, data: list, tok, args: argparse.Namespace, callbacks: list) -> dict:
    from transformers import BertForMaskedLM, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    from tpde_hf.examples import example_path

    torch.manual_seed(0)
    model = BertForMaskedLM.from_pretrained(example_path("minilm"))
    model.load_state_dict(init)
    targs = TrainingArguments(str(out), per_device_train_batch_size=args.batch, learning_rate=5e-5,
                              lr_scheduler_type="constant", weight_decay=0.01, max_steps=args.steps,
                              save_steps=args.save_steps, logging_steps=args.save_steps, report_to=[], seed=0,
                              use_cpu=True, dataloader_num_workers=0, disable_tqdm=True)
    clock = _StepClock()
    # the clock after the callbacks: a step's time includes the callback's wait for a pack at that step's save
    tr = Trainer(model=model, args=targs, train_dataset=data, callbacks=[*callbacks, clock],
                 data_collator=DataCollatorForLanguageModeling(tok, mlm_probability=0.15))
    tr.train()
    t = np.diff(clock.t[:-1])
    return {"step_s": t.tolist(), "mean_step_s": float(t.mean()), "total_s": clock.t[-1] - clock.t[0],
            "losses": [h["loss"] for h in tr.state.log_history if "loss" in h]}


def _kind(key: str) -> str:
    name = key.split(":", 1)[1] if ":" in key else key
    if key.startswith("model") and ".safetensors:" in key:
        return "weights"
    if name.endswith("/exp_avg"):
        return "exp_avg"
    if name.endswith("/exp_avg_sq"):
        return "exp_avg_sq"
    return "other"


def _kind_streams(ckpt: Path) -> tuple[dict[str, bytes], dict[str, int]]:
    """Each kind's raw bytes (tensors of >= 4096 values, file order) and value counts, from plain files."""
    from tpde_hf.checkpoints.layout import tensor_ranges

    streams: dict[str, list[bytes]] = {k: [] for k in KINDS}
    for f in sorted(ckpt.iterdir()):
        if not f.is_file():
            continue
        data = f.read_bytes()
        for r in tensor_ranges(f):
            k = _kind(f"{f.name}:{r.name}")
            if k in streams and r.nbytes >= 4096 * 4:
                streams[k].append(data[r.offset:r.offset + r.nbytes])
    joined = {k: b"".join(v) for k, v in streams.items()}
    return joined, {k: len(v) // 4 for k, v in joined.items()}


def _entry_bits(entry: Path) -> dict[str, int]:
    """Stored bytes of an entry by kind (coded parts; skeletons and the header count as 'other')."""
    import struct

    from tpde_hf.codec.registry import group_coded_keys

    with open(entry, "rb") as f:
        (hlen,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(hlen))
    size = {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}
    out = dict.fromkeys((*KINDS, "other"), 0)
    for key, g in group_coded_keys(size).items():
        out[_kind(key)] += sum(size[k] for k in g.parts.values())
    out["other"] += entry.stat().st_size - sum(out.values())
    return out


def _zipnn(streams: dict[str, bytes], files: list[Path], work: Path) -> dict:
    """ZipNN (peer venv, own subprocess) on each kind's bytes and each whole file; round trip checked."""
    py = ROOT / ".venv-peers/bin/python"
    if not py.exists():
        return {"error": "not installed (scripts/install_peers.sh)"}
    for k, v in streams.items():
        (work / f"{k}.bin").write_bytes(v)
    names = [f"{k}.bin" for k in streams] + [str(f) for f in files]
    code = (
        "import sys, json, time, hashlib\nfrom zipnn import ZipNN\n"
        "zn = ZipNN(input_format='byte', bytearray_dtype='float32', threads=2)\nout = {}\n"
        "for n in sys.argv[2:]:\n"
        "    p = n if n.startswith('/') else sys.argv[1] + '/' + n\n"
        "    data = open(p, 'rb').read()\n"
        "    t = time.perf_counter(); c = zn.compress(bytearray(data)); tc = time.perf_counter() - t\n"
        "    t = time.perf_counter(); back = zn.decompress(bytearray(c)); td = time.perf_counter() - t\n"
        "    out[n] = {'raw': len(data), 'stored': len(c), 'compress_s': tc, 'decompress_s': td,\n"
        "              'exact': hashlib.sha256(bytes(back)).digest() == hashlib.sha256(data).digest()}\n"
        "print(json.dumps(out))\n"
    )
    try:
        res = subprocess.run([str(py), "-c", code, str(work), *names], capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return {"error": "timed out"}
    if res.returncode != 0:
        return {"error": res.stderr.strip().splitlines()[-1] if res.stderr.strip() else f"exit {res.returncode}"}
    return json.loads(res.stdout.strip().splitlines()[-1])


def _zstd(data: bytes, level: int) -> int:
    return len(zstandard.ZstdCompressor(level=level, threads=-1).compress(data))


def _sizes(entry: Path, tdir: Path, pdir: Path, files: list[Path], raw: int, work: Path,
           baselines: bool = True) -> dict:
    """Bits per value and whole-checkpoint bytes of one packed checkpoint and of its baselines (zstd -3, ZipNN),
    measured on the plain checkpoint ``pdir``; ``zipnn_raw``: ZipNN's own answer (per file, or its error).
    ``baselines=False``: tpde's figures only."""
    stored_total = entry.stat().st_size + sum(f.stat().st_size for f in tdir.iterdir() if f.is_file())
    streams, counts = _kind_streams(pdir)
    ours = _entry_bits(entry)
    if not baselines:
        return {"values": counts, "bits_per_value": {"tpde": {k: 8 * ours[k] / counts[k] for k in KINDS}},
                "whole_checkpoint_bytes": {"raw": raw, "tpde": stored_total},
                "whole_checkpoint_vs_raw": {"tpde": stored_total / raw}, "zipnn_raw": None}
    zs = {k: _zstd(v, 3) for k, v in streams.items()}
    zfile = sum(_zstd(f.read_bytes(), 3) for f in files)
    zn = _zipnn(streams, [f for f in files if f.stat().st_size > 1 << 20], work)
    zn_file = None
    if "error" not in zn:
        zn_file = sum(zn[str(f)]["stored"] if str(f) in zn else f.stat().st_size for f in files)
    return {
        "values": counts,
        "bits_per_value": {
            "tpde": {k: 8 * ours[k] / counts[k] for k in KINDS},
            "zstd-3": {k: 8 * zs[k] / counts[k] for k in KINDS},
            "zipnn": {k: 8 * zn[f"{k}.bin"]["stored"] / counts[k] for k in KINDS} if "error" not in zn else zn,
            "raw": dict.fromkeys(KINDS, 32.0),
        },
        "whole_checkpoint_bytes": {"raw": raw, "tpde": stored_total, "zstd-3": zfile, "zipnn": zn_file},
        "whole_checkpoint_vs_raw": {"tpde": stored_total / raw, "zstd-3": zfile / raw,
                                    "zipnn": zn_file / raw if zn_file else None},
        "zipnn_raw": zn,
    }


_FRESH_RESTORE = """
import json, os, sys, time
from tpde_hf.checkpoints import api
w, c = time.perf_counter(), time.process_time()
api.restore(sys.argv[1], out=sys.argv[2])
print(json.dumps([time.perf_counter() - w, time.process_time() - c]))
"""


def _fresh_restore(ckpt: Path, dst: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of one ``api.restore`` in a new process (imports done first, not timed): what a
    resuming user pays, with fresh heap pages and numba's cache loaded from disk."""
    shutil.rmtree(dst, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    # run from the destination's folder: ``python -c`` puts its working folder first on sys.path, which would
    # shadow a PYTHONPATH copy of an older tpde_hf with the one in the current folder
    done = subprocess.run([sys.executable, "-c", _FRESH_RESTORE, str(ckpt), str(dst)], capture_output=True,
                          text=True, env=env, check=True, cwd=dst.parent)
    shutil.rmtree(dst, ignore_errors=True)
    return tuple(json.loads(done.stdout.strip().splitlines()[-1]))


def measure_restore(run_dir: Path, repeat: int = 3, fresh: bool = False) -> dict:
    """Restore speed of every checkpoint of ``run_dir``: wall and CPU seconds, best of ``repeat``.

    A plain checkpoint (the newest, with backward deltas) needs no restore: Trainer reads its files; the
    row gives the time to read and hash them, for scale. A packed one: the whole chain
    (``restore(..., out=...)``, files written; ``entries_decoded`` entries, plus the plain files a
    backward chain ends at) and one link (its entry decoded against its already decoded parent and
    every file rebuilt and hashed). CPU seconds (``time.process_time``, all threads) are reported beside
    wall seconds because the shared machine's load moves wall time several-fold; MB are of checkpoint
    files restored. ``fresh``: also the whole chain in a new process per run (``chain_fresh_*``): in-process
    repeats reuse the allocator's pages and hide their faults.
    """
    import numba

    from tpde_hf.checkpoints import api
    from tpde_hf.checkpoints import store as S

    root = run_dir / S.STORE_DIRNAME
    out = {"numba_threads": numba.get_num_threads(), "loadavg": os.getloadavg(), "checkpoints": []}
    dirs = sorted((d for d in run_dir.glob("checkpoint-*") if d.is_dir()), key=lambda d: int(d.name.split("-")[1]))
    for d in dirs:
        name = d.name
        if not api.is_packed(d):
            files = [f for f in d.iterdir() if f.is_file()]
            raw = sum(f.stat().st_size for f in files)
            runs = []
            for _ in range(repeat):
                w, c = time.perf_counter(), time.process_time()
                for f in files:
                    xxhash.xxh3_64_hexdigest(f.read_bytes())
                runs.append((time.perf_counter() - w, time.process_time() - c))
            bw = min(t[0] for t in runs)
            out["checkpoints"].append({"checkpoint": name, "plain": True, "entries_decoded": 0, "raw_bytes": raw,
                                       "read_and_hash_wall_s": bw, "read_and_hash_MBps_wall": raw / bw / 1e6})
            print(json.dumps(out["checkpoints"][-1]), flush=True)
            continue
        man = S.read_manifest(S.entry_path(root, name))
        raw = sum(f["size"] for f in man["files"])
        paths, plain_end = S.links(root, name)
        chain, link = [], []
        parent = S.decode_chain(root, man["parent"]) if man["parent"] else None
        for _ in range(repeat):
            dst = run_dir.parent / f"restore-{name}"
            shutil.rmtree(dst, ignore_errors=True)
            w, c = time.perf_counter(), time.process_time()
            api.restore(run_dir / name, out=dst)
            chain.append((time.perf_counter() - w, time.process_time() - c))
            shutil.rmtree(dst, ignore_errors=True)
            w, c = time.perf_counter(), time.process_time()
            dec = S.decode_entry(S.entry_path(root, name), parent)
            for f in dec.manifest["files"]:
                S.rebuild(dec, f["name"])
            link.append((time.perf_counter() - w, time.process_time() - c))
            del dec
        fresh_runs = [_fresh_restore(run_dir / name, run_dir.parent / f"restore-{name}") for _ in range(repeat)
                      if fresh]
        bw, bc = min(t[0] for t in chain), min(t[1] for t in chain)
        lw, lc = min(t[0] for t in link), min(t[1] for t in link)
        out["checkpoints"].append({
            "checkpoint": name, "parent": man["parent"], "layout": "backward" if man["version"] == 2 else "forward",
            "entries_decoded": len(paths), "chain_ends_at_plain": plain_end is not None, "raw_bytes": raw,
            "chain_wall_s": bw, "chain_cpu_s": bc, "chain_MBps_wall": raw / bw / 1e6,
            "link_wall_s": lw, "link_cpu_s": lc, "link_MBps_wall": raw / lw / 1e6,
            "link_MB_per_cpu_s": raw / lc / 1e6, "runs": {"chain": chain, "link": link, "chain_fresh": fresh_runs}})
        if fresh_runs:
            fw = min(t[0] for t in fresh_runs)
            out["checkpoints"][-1].update(chain_fresh_wall_s=fw, chain_fresh_cpu_s=min(t[1] for t in fresh_runs),
                                          chain_fresh_MBps_wall=raw / fw / 1e6)
        print(json.dumps({k: v for k, v in out["checkpoints"][-1].items() if k != "runs"}), flush=True)
    out["loadavg_end"] = os.getloadavg()
    return out


def _param_names(ckpt: Path) -> list[str]:
    """The optimizer's parameter order of Trainer's default AdamW groups (decayed first, then the rest)."""
    from transformers import AutoConfig, BertForMaskedLM, Trainer

    model = BertForMaskedLM(AutoConfig.from_pretrained(ckpt))
    decay = set(Trainer.get_decay_parameter_names(None, model))  # does not use self
    named = [n for n, _ in model.named_parameters()]
    return [n for n in named if n in decay] + [n for n in named if n not in decay]


def _check_and_size(entry: Path, ref, pdir: Path, tdir: Path, work: Path, removed: list[str],
                    baselines: bool = True) -> tuple[dict, object]:
    """Decode ``entry`` against ``ref``, check every file against the plain one's hash, measure its sizes."""
    from tpde_hf.checkpoints import store as S

    files = sorted(f for f in pdir.iterdir() if f.is_file())
    raw = sum(f.stat().st_size for f in files)
    man = S.read_manifest(entry)
    dec = S.decode_entry(entry, ref if man["parent"] else None)
    exact = True
    for f in files:
        rec = next((r for r in man["files"] if r["name"] == f.name), None)
        if rec is None or rec["xxh3"] != xxhash.xxh3_64_hexdigest(f.read_bytes()):
            exact = False
        elif f.name in removed:
            S.file_digest(dec, f.name)  # raises if the decoded bytes differ
    sizes = _sizes(entry, tdir, pdir, files, raw, work, baselines)
    sizes.pop("zipnn_raw")
    row = {"checkpoint": pdir.name, "parent": man["parent"], "raw_bytes": raw,
           "decoded_files_match_plain_files": exact, **sizes}
    print(json.dumps({k: row[k] for k in ("checkpoint", "parent", "decoded_files_match_plain_files",
                                         "whole_checkpoint_vs_raw", "bits_per_value")}), flush=True)
    return row, dec


def sizes_from(run_dir: Path, work: Path, keyframe_every: int = 8, backward: bool = True,
               baselines: bool = True) -> dict:
    """Pack a copy of every plain checkpoint of ``run_dir`` in step order, as the callback does (backward:
    at each save the previous checkpoint becomes a delta against the new one; forward: the new one a
    delta against the previous), and measure each entry against raw, zstd and ZipNN on the plain files.
    Each entry is decoded against its decoded parent and every file's bytes checked against the plain
    file's hash."""
    from tpde_hf.checkpoints import api
    from tpde_hf.checkpoints import backward as B
    from tpde_hf.checkpoints import store as S

    ckpts = sorted((d for d in run_dir.glob("checkpoint-*") if d.is_dir()), key=lambda d: int(d.name.split("-")[1]))
    names = _param_names(ckpts[0])
    packed = work / "packed"
    shutil.rmtree(packed, ignore_errors=True)
    packed.mkdir(parents=True)
    rows, parent, cache = [], None, None
    for pdir in ckpts:
        tdir = packed / pdir.name
        shutil.copytree(pdir, tdir)
        if backward:
            done, head = B.advance(tdir, keyframe_every=keyframe_every, param_names=names, cache=cache, verify=True)
            for r in done:
                row, _ = _check_and_size(r["entry"], head, run_dir / r["name"], packed / r["name"], work,
                                         api.read_pointer(packed / r["name"])["removed"], baselines)
                row["keyframe"] = r["parent"] is None
                rows.append(row)
            cache = head
            continue
        res = api.pack(tdir, param_names=names, keyframe_every=keyframe_every, verify=True, cache=parent)
        row, parent = _check_and_size(res.entry, parent, pdir, tdir, work, api.read_pointer(tdir)["removed"],
                                      baselines)
        row["chain_length"] = S.read_manifest(res.entry)["depth"] + 1
        rows.append(row)
    return {"run_dir": str(run_dir), "keyframe_every": keyframe_every,
            "layout": "backward" if backward else "forward", "checkpoints": rows}


def interval_sizes(run_dir: Path, work: Path, intervals: list[int], span: int) -> dict:
    """Delta size against the checkpoint interval M, from one plain run saved every few steps: for each M, the
    run's checkpoints ``last - span, last - span + M, ..., last`` (every M steps, the same end) are packed as the
    callback would (backward, keyframes never inside the span) with tpde only, every entry decoded and checked
    against the plain files' hashes. Rows are the delta entries (a keyframe or the plain newest is not a delta)."""
    steps = sorted(int(d.name.split("-")[1]) for d in run_dir.glob("checkpoint-*") if d.is_dir())
    last, out = steps[-1], {}
    for m in intervals:
        chosen = [s for s in steps if last - span <= s <= last and (last - s) % m == 0]
        if len(chosen) < 2:
            out[str(m)] = {"error": f"fewer than two checkpoints {m} steps apart in the last {span} steps"}
            continue
        subset = work / f"every{m}"
        shutil.rmtree(subset, ignore_errors=True)
        subset.mkdir(parents=True)
        for s in chosen:
            (subset / f"checkpoint-{s}").symlink_to((run_dir / f"checkpoint-{s}").resolve())
        res = sizes_from(subset, work / f"work{m}", keyframe_every=len(chosen) + 1, baselines=False)
        deltas = [r for r in res["checkpoints"] if r["parent"]]
        raw = sum(r["whole_checkpoint_bytes"]["raw"] for r in deltas)
        stored = sum(r["whole_checkpoint_bytes"]["tpde"] for r in deltas)
        out[str(m)] = {"checkpoints": chosen, "deltas": len(deltas), "all_exact": all(
            r["decoded_files_match_plain_files"] for r in deltas), "whole_checkpoint_vs_raw_mean": stored / raw,
            "bits_per_value_mean": {k: sum(r["bits_per_value"]["tpde"][k] for r in deltas) / len(deltas)
                                    for k in KINDS}, "rows": deltas}
        shutil.rmtree(work / f"work{m}", ignore_errors=True)
        print(json.dumps({"M": m, "vs_raw": out[str(m)]["whole_checkpoint_vs_raw_mean"]}), flush=True)
    return {"run_dir": str(run_dir), "span": span, "last": last, "intervals": out}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--save-steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/checkpoints.json"))
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed)")
    ap.add_argument("--restore-only", default=None, metavar="RUN_DIR",
                    help="only time restoring the packed checkpoints of RUN_DIR (a kept --work/tpde) into --out")
    ap.add_argument("--repeat", type=int, default=3, help="--restore-only: best of this many runs")
    ap.add_argument("--fresh", action="store_true",
                    help="--restore-only: also time each whole chain in a new process per run")
    ap.add_argument("--train-only", action="store_true",
                    help="only the plain run (no callback, no timing claims), its checkpoints kept in --work/plain")
    ap.add_argument("--sizes-from", default=None, metavar="RUN_DIR",
                    help="only sizes: pack copies of RUN_DIR's plain checkpoints (into --work) and compare")
    ap.add_argument("--intervals", default=None, metavar="M,M,...",
                    help="with --sizes-from: tpde's delta size for checkpoints every M steps (the same last "
                         "--span steps of the run), e.g. 5,10,20,40")
    ap.add_argument("--span", type=int, default=80, help="--intervals: the run's last SPAN steps")
    ap.add_argument("--keyframe-every", type=int, default=8,
                    help="--sizes-from (without --intervals): the store's keyframe_every (restores decode at most "
                         "this many entries; a keyframe is coded alone)")
    ap.add_argument("--callbacks", default=None, metavar="LIST",
                    help="training runs to compare with the plain run, comma-separated: " + ", ".join(CONFIGS))
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the plain run and every --callbacks run this many times (alternating)")
    ap.add_argument("--timing-only", action="store_true",
                    help="skip sizes and baselines (zstd, ZipNN) of the training run: step time, exactness, restore")
    ap.add_argument("--forward", action="store_true",
                    help="forward deltas (each checkpoint against the previous) instead of the default backward")
    args = ap.parse_args(argv)
    if args.sizes_from:
        work = Path(args.work or tempfile.mkdtemp(prefix="bench-ckpt-"))
        res = {"benchmark": "bench_checkpoints --sizes-from", "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                       time.gmtime()),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
               **(interval_sizes(Path(args.sizes_from), work, [int(m) for m in args.intervals.split(",")],
                                 args.span) if args.intervals else
                  sizes_from(Path(args.sizes_from), work, keyframe_every=args.keyframe_every,
                             backward=not args.forward))}
        Path(args.out).write_text(json.dumps(res, indent=1))
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    if args.restore_only:
        res = {"benchmark": "bench_checkpoints --restore-only", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                      time.gmtime()),
               "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
               **measure_restore(Path(args.restore_only), repeat=args.repeat, fresh=args.fresh)}
        Path(args.out).write_text(json.dumps(res, indent=1))
        return 0
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    torch.set_num_threads(2)
    from transformers import AutoTokenizer, BertForMaskedLM

    from tpde_hf.checkpoints.callback import TpdeCheckpointCallback
    from tpde_hf.examples import example_path

    work = Path(args.work or tempfile.mkdtemp(prefix="bench-ckpt-"))
    shutil.rmtree(work / "plain", ignore_errors=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load0 = os.getloadavg()
    import tpde_hf.checkpoints as measured  # the code actually imported (PYTHONPATH may point at an older copy)

    code = {f.name: xxhash.xxh3_64_hexdigest(f.read_bytes())
            for f in sorted(Path(measured.__file__).parent.glob("*.py"))}
    code["package"] = str(Path(measured.__file__).parent)
    tok = AutoTokenizer.from_pretrained(example_path("minilm"))
    data = _text(tok, args.seq)
    torch.manual_seed(0)
    init = {k: v.clone() for k, v in BertForMaskedLM.from_pretrained(example_path("minilm")).state_dict().items()}

    plain = _train(work / "plain", init, data, tok, args, [])
    if args.train_only:
        (work / "plain_run.json").write_text(json.dumps({"recipe": vars(args), "started": started, **plain}))
        return 0
    configs = args.callbacks.split(",") if args.callbacks else ["forward" if args.forward else "backward"]
    for cfg in configs:
        if cfg not in CONFIGS:
            raise SystemExit(f"unknown --callbacks entry {cfg!r} (known: {', '.join(CONFIGS)})")
    runs, restores, exact_all, results, waits = {}, {}, {}, {}, {}
    def steady(run: dict) -> float:
        return float(np.mean(run["step_s"][2 * args.save_steps:]))

    rounds = [{"plain": steady(plain)}]
    for r in range(args.rounds):
        if r > 0:  # the plain run again, so every round compares runs made close together
            rounds.append({"plain": steady(_train(work / "plain-again", init, data, tok, args, []))})
        for cfg in configs:
            cb = TpdeCheckpointCallback(keyframe_every=8, **CONFIGS[cfg])
            shutil.rmtree(work / cfg, ignore_errors=True)
            run = _train(work / cfg, init, data, tok, args, [cb])
            rounds[-1][cfg] = steady(run)
            waits.setdefault(cfg, []).append(cb.waits)
            if r == 0:
                runs[cfg] = run
                results[cfg] = [{"name": x.name, "parent": x.parent, "raw": x.raw_bytes, "stored": x.stored_bytes}
                                for x in cb.results]
                exact_all[cfg], restores[cfg] = _check_run(work, cfg)
            print(json.dumps({"round": r, "callbacks": cfg, "steady_mean_step_s": rounds[-1][cfg],
                              "plain_steady_mean_step_s": rounds[-1]["plain"], "waits_s": cb.waits,
                              "exact": exact_all[cfg]}), flush=True)
    first = configs[0]
    rows = [] if args.timing_only else _size_rows(work, first)

    def step_time(run: dict) -> dict:
        return {"mean_s": run["mean_step_s"], "overhead": run["mean_step_s"] / plain["mean_step_s"] - 1,
                "median_s": float(np.median(run["step_s"])),
                "median_overhead": float(np.median(run["step_s"]) / np.median(plain["step_s"]) - 1),
                # the callback waits for the pack in flight in the save step's on_step_end (before the clock)
                "save_steps": [{"step": s, "plain_s": plain["step_s"][s - 1], "s": run["step_s"][s - 1]}
                               for s in range(args.save_steps, args.steps + 1, args.save_steps)],
                # steady state: from the end of the second save on, every save interval holds one pack and one
                # wait with either layout (backward packs checkpoint N at the save of N+1, forward at N's own)
                "steady_from_step": 2 * args.save_steps + 1,
                "steady_mean_s": float(np.mean(run["step_s"][2 * args.save_steps:])),
                "steady_overhead": float(np.mean(run["step_s"][2 * args.save_steps:])
                                         / np.mean(plain["step_s"][2 * args.save_steps:]) - 1),
                "total_s": run["total_s"], "step_s": run["step_s"], "losses_equal": plain["losses"] == run["losses"]}

    result = {
        "benchmark": "bench_checkpoints", "started": started, "finished": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                                          time.gmtime()),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_start": load0, "loadavg_end": os.getloadavg(), "python": sys.version.split()[0],
                    # the checkpoint code measured (the tree is shared and edited while benchmarks run)
                    "tpde_checkpoints_xxh3": code},
        "recipe": {"model": "all-MiniLM-L6-v2 as BertForMaskedLM, fp32", "text": ".venv package METADATA/README",
                   "optimizer": "AdamW (torch) lr 5e-5 constant, wd 0.01, betas (0.9, 0.999)", "steps": args.steps,
                   "save_steps": args.save_steps, "batch": args.batch, "seq": args.seq, "keyframe_every": 8,
                   "callbacks": {c: {"verify": True, "nice": 19, "background": True, **CONFIGS[c]} for c in configs},
                   "order": ["plain", *configs]},
        "step_time": {"plain_mean_s": plain["mean_step_s"], "plain_median_s": float(np.median(plain["step_s"])),
                      "plain_total_s": plain["total_s"], "plain_step_s": plain["step_s"],
                      **{c: step_time(runs[c]) for c in configs}},
        "rounds": [{k: v for k, v in rd.items()} | {f"{c}_overhead": rd[c] / rd["plain"] - 1 for c in configs}
                   for rd in rounds],
        # rounds: steady-state mean step time (see step_time.*.steady_from_step) of each run
        "median_overhead_over_rounds": {c: float(np.median([rd[c] / rd["plain"] - 1 for rd in rounds]))
                                        for c in configs},
        "waits_s": waits,
        "state_files_exact_vs_plain_run": exact_all, "restore_each_checkpoint": restores,
        "checkpoints": rows, "sizes_of": None if args.timing_only else first, "pack_results": results,
        "anchor": "nvCOMP checkpoint post: 21-29% smaller whole checkpoints, lossless, no delta",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: {c: {x: y for x, y in v.items() if x not in ("step_s", "save_steps")}
                          if isinstance(v, dict) else v for c, v in result["step_time"].items()}
                      for k in ("step_time",)}, indent=1, default=str)[:4000])
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


#: Callback variants a run can compare (``--callbacks backward,forward,...``), each against the same plain run.
CONFIGS = {
    "backward": {"backward": True, "assist": True},
    "backward-noassist": {"backward": True, "assist": False},
    "forward": {"backward": False, "assist": True},
    "forward-noassist": {"backward": False, "assist": False},  # the callback before this change
    "backward-idle": {"backward": True, "assist": True, "sched_idle": True},
    # no pack thread: each save packs on the training thread (numba's workers on every core), nothing runs
    # beside training between saves
    "backward-sync": {"backward": True, "background": False},
    # the pack runs only in the wait at the next save, on every core at normal priority, nothing beside training
    "backward-defer": {"backward": True, "defer": True},
    # the pack thread at training's own priority: it takes its share of the cores beside training at once
    "backward-nice0": {"backward": True, "nice": 0},
}


def _check_run(work: Path, cfg: str) -> tuple[bool, list[dict]]:
    """Restore every checkpoint of the run ``cfg`` (timed, files written) and compare its state files with
    the plain run's."""
    from tpde_hf.checkpoints import api
    from tpde_hf.checkpoints import store as S

    out, exact_all = [], True
    for pdir in sorted((work / "plain").glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1])):
        tdir = work / cfg / pdir.name
        files = sorted(f for f in pdir.iterdir() if f.is_file())
        raw = sum(f.stat().st_size for f in files)
        restored = work / "restored" / cfg / pdir.name
        shutil.rmtree(restored, ignore_errors=True)
        packed = api.is_packed(tdir)
        n_links = len(S.chain(work / cfg / S.STORE_DIRNAME, pdir.name)) if packed else 0
        t = time.perf_counter()
        api.restore(tdir, out=restored)
        dt = time.perf_counter() - t
        # training_args.bin and trainer_state.json name the run's own folder; the state files must match
        same = [f for f in files if f.name in ("model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth")]
        exact = len(same) == 4 and all(xxhash.xxh3_64_hexdigest((restored / f.name).read_bytes()) ==
                                       xxhash.xxh3_64_hexdigest(f.read_bytes()) for f in same)
        exact_all &= exact
        out.append({"checkpoint": pdir.name, "packed": packed, "entries_decoded": n_links, "exact": exact,
                    "restore_s": dt, "restore_MBps": raw / dt / 1e6})
        shutil.rmtree(restored, ignore_errors=True)
    return exact_all, out


def _size_rows(work: Path, cfg: str) -> list[dict]:
    """Sizes of every packed checkpoint of run ``cfg`` against raw, zstd and ZipNN on the plain run's files."""
    from tpde_hf.checkpoints import api
    from tpde_hf.checkpoints import store as S

    rows = []
    for pdir in sorted((work / "plain").glob("checkpoint-*"), key=lambda d: int(d.name.split("-")[1])):
        tdir = work / cfg / pdir.name
        if not api.is_packed(tdir):
            continue
        files = sorted(f for f in pdir.iterdir() if f.is_file())
        raw = sum(f.stat().st_size for f in files)
        entry = S.entry_path(work / cfg / S.STORE_DIRNAME, pdir.name)
        man = S.read_manifest(entry)
        sizes = _sizes(entry, tdir, pdir, files, raw, work)
        zn = sizes.pop("zipnn_raw")
        rows.append({"checkpoint": pdir.name, "parent": man["parent"], "raw_bytes": raw, **sizes,
                     "zipnn_exact": all(v.get("exact", False) for v in zn.values()) if "error" not in zn else None})
        print(json.dumps({k: rows[-1][k] for k in ("checkpoint", "parent", "whole_checkpoint_vs_raw")}), flush=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
