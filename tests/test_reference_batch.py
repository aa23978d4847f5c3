"""The load path of delta repos: cached kernels without numba's set-up (fastload), the batch decode of many
``ref-ord`` tensors (batch), the prefetch built on it, and the decode started at ``config.json`` (early)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

import tpde_hf.reference.codec as C
from tpde_hf.codec.registry import CodecContext
from tpde_hf.errors import TpdeFormatError
from tpde_hf.reference import early, fastload
from tpde_hf.reference import kernels as K
from tpde_hf.reference.batch import BatchDecode
from tpde_hf.reference.fastload import cached_entry, call

sys.path.insert(0, str(Path(__file__).parent))
from test_reference import bits_equal, make_pair, pair  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CASES = [(torch.bfloat16, (70_001,)), (torch.float16, (33, 65)), (torch.float32, (3, 5, 7)), (torch.bfloat16, (1,)),
         (torch.float32, (140_000,)), (torch.bfloat16, (300, 257))]


def coded(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(blob, base, fine-tune) for every case: every dtype, odd shapes, ±0, subnormals, inf/NaN (see ``pair``)."""
    out = []
    for i, (dtype, shape) in enumerate(CASES):
        base, tuned = pair(dtype, shape, seed=seed + i)
        blob = C.RefOrd().encode(tuned, CodecContext("w", base, {"force": True}))["blob"]
        out.append((blob, base, tuned))
    return out


def test_fastload_runs_the_cached_kernel_bit_exact() -> None:
    blob, base, tuned = coded()[0]
    out = C.RefOrd().decode({"blob": blob}, CodecContext("w", base, {"serial": True}))  # fills numba's cache
    assert bits_equal(out, tuned)
    job = C.prepare_ord(blob, base, "w")
    fastload._ENTRIES.clear()  # a fresh clone compiled just now (numba's path): read the cache it wrote
    assert cached_entry(K.rans_decode_serial, *job.kernel_args(), np.zeros(job.n_chunks, np.int64))
    status = np.zeros(job.n_chunks, np.int64)
    call(K.rans_decode_serial, *job.kernel_args(), status)
    assert bits_equal(job.finish(status), tuned)
    assert call(lambda a, b: a + b, 2, 3) == 5  # no numba dispatcher: called as it is


def test_fresh_process_decodes_without_numba_typing_setup() -> None:
    """In a fresh process, the cached kernels run without numba refreshing its typing context."""
    code = (
        "import numpy as np, torch\n"
        "from numba.core.registry import cpu_target\n"
        "from tpde_hf.reference.load import _warm_kernels\n"
        "_warm_kernels()\n"
        "ctx = cpu_target.typing_context\n"
        "print('refreshed' if ctx._registries else 'clean')\n"
    )
    _warm = subprocess.run([sys.executable, "-c", "from tpde_hf.reference.load import _warm_kernels; _warm_kernels()"],
                           capture_output=True, text=True)  # first: make sure the cache exists
    assert _warm.returncode == 0, _warm.stderr
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "clean"


@pytest.mark.parametrize("threads", [1, 3])
def test_batch_decode_is_bit_exact_in_groups_and_batches(threads: int) -> None:
    items = coded(seed=threads)
    batch = BatchDecode(batch_weights=1 << 16)  # a batch per chunk or so: many claims, tensors split across them
    workers = [threading.Thread(target=batch.work) for _ in range(threads)]
    for w in workers:
        w.start()
    first = batch.add([C.prepare_ord(b, r, f"w{i}") for i, (b, r, _) in enumerate(items[:3])])
    second = batch.add([C.prepare_ord(b, r, f"w{i}") for i, (b, r, _) in enumerate(items[3:], 3)])
    batch.close()
    for i, (_, _, tuned) in zip(first + second, items, strict=True):
        assert bits_equal(batch.result(i), tuned)
    for w in workers:
        w.join(timeout=60)
        assert not w.is_alive()


def test_batch_decode_damaged_stream_and_wrong_reference_are_clear_errors() -> None:
    items = coded(seed=7)
    blob, base, tuned = items[0]
    damaged = blob.clone()
    damaged[-40] ^= 0x10  # a word of the raw stream
    other = pair(torch.bfloat16, (70_001,), seed=99)[0]
    batch = BatchDecode(batch_weights=1 << 16)
    idx = batch.add([C.prepare_ord(damaged, base, "damaged"), C.prepare_ord(blob, other, "wrong-ref"),
                     C.prepare_ord(blob, base, "good")])
    batch.close()
    batch.work()
    for i, name in zip(idx[:2], ("damaged", "wrong-ref"), strict=True):
        with pytest.raises(TpdeFormatError, match=name):
            batch.result(i)
    assert bits_equal(batch.result(idx[2]), tuned)


def test_batch_corruption_sweep() -> None:
    """Seeded bit flips anywhere in a blob: preparing it raises the clear error, or its decode does, or the
    result is bit-exact (a flip in padding)."""
    blob, base, tuned = coded(seed=3)[4]
    g = np.random.default_rng(1234)
    outcomes = {"error": 0, "exact": 0}
    for _ in range(40):
        bad = blob.clone()
        pos = int(g.integers(0, bad.numel()))
        bad[pos] ^= int(1 << g.integers(0, 8))
        try:
            batch = BatchDecode(batch_weights=1 << 16)
            (i,) = batch.add([C.prepare_ord(bad, base, "swept")])
            batch.close()
            batch.work()
            out = batch.result(i)
        except TpdeFormatError as exc:
            assert "swept" in str(exc)
            outcomes["error"] += 1
            continue
        assert bits_equal(out, tuned)
        outcomes["exact"] += 1
    assert outcomes["error"] > 30


def test_cancel_leaves_undecoded_tensors_to_the_caller() -> None:
    items = coded(seed=5)
    batch = BatchDecode(batch_weights=1 << 16)
    idx = batch.add([C.prepare_ord(b, r, f"w{i}") for i, (b, r, _) in enumerate(items)])
    batch.cancel()
    batch.work()  # returns at once
    assert all(batch.result(i) is None for i in idx)


def test_early_start_only_inside_a_model_load_and_adopted_by_it(tmp_path: Path, monkeypatch) -> None:
    """``config.json`` read inside ``from_pretrained`` starts the decode; the quantizer adopts it; a config read
    alone starts nothing; the model is bit-exact."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import tpde_hf.reference.prefetch as P
    from tpde_hf.conversion import convert

    base, ft, tensors = make_pair("llama", tmp_path)
    convert(ft, tmp_path / "out", reference=base, workers=1)
    assert early.weight_files(str(tmp_path / "out")) == [str(tmp_path / "out" / "model.safetensors")]
    assert early.weight_files(str(tmp_path / "nowhere")) == []
    early.install()
    made = []
    init = P.Prefetch.__init__

    def counting_init(self, *a, **k):
        made.append(k.get("workers"))
        init(self, *a, **k)

    monkeypatch.setattr(P.Prefetch, "__init__", counting_init)
    AutoConfig.from_pretrained(tmp_path / "out")
    assert made == [] and not early._EARLY
    adopted = []
    adopt = early.adopt
    monkeypatch.setattr(early, "adopt", lambda *a: adopted.append(adopt(*a)) or adopted[-1])
    sd = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert made == [1] and adopted and adopted[0] is not None and not early._EARLY  # one prefetch: the early one
    for k, v in tensors.items():
        assert bits_equal(sd[k], v), k
    monkeypatch.setenv("TPDE_REFERENCE_WORKERS", "0")
    made.clear()
    sd = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert made == [] and all(bits_equal(sd[k], v) for k, v in tensors.items())


def test_fresh_process_load_exits_cleanly(tmp_path: Path) -> None:
    """The decode threads end before the interpreter does (a daemon thread stopped inside torch aborted it)."""
    from tpde_hf.conversion import convert

    base, ft, _ = make_pair("llama", tmp_path)
    convert(ft, tmp_path / "out", reference=base, workers=1)
    code = ("import sys, tpde_hf, transformers; from tpde_hf.reference.early import install; install(); "
            "transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1]); print('loaded')")
    for _ in range(3):
        p = subprocess.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True)
        assert p.returncode == 0 and "terminate called" not in p.stderr, p.stderr[-2000:]
        assert p.stdout.strip().endswith("loaded")


@pytest.mark.parametrize("value, installed", [("1", True), (None, True), ("0", False)])
def test_early_start_is_on_by_default_at_import(value: str | None, installed: bool) -> None:
    """``import tpde_hf`` installs the early start unless ``TPDE_REFERENCE_EARLY=0``."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "TPDE_REFERENCE_EARLY"}
    if value is not None:
        env["TPDE_REFERENCE_EARLY"] = value
    code = ("import sys, tpde_hf; print(any(getattr(f, '_tpde_early_reference', False) for f in sys.meta_path) "
            "or 'tpde_hf.reference.early' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == str(installed)
