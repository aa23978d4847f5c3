"""The ``ref-ord`` byte layout (version 1) stays readable and unchanged, and the load starts decoding early.

``tests/fixtures/formats/ref-ord-v1.safetensors`` holds, per case, a reference tensor, the fine-tuned tensor and
the ``ref-ord`` blob that the layout-1 writer made of them (2026-12-07, before the decoder was rewritten with
two-level tables): bf16 over four chunks with an odd length (lane tail), bf16 with 16 x 1 contexts, fp16 (odd
shape), fp32, and a 5-element bf16 tensor with one context; each with ±0, subnormals, inf/NaN and random bit
patterns on either side (``test_reference.pair``, seeds 40-44). It was made with ``codec.CHUNK = 1024`` (so a
small file has several chunks) and ``options={"configs": ((n_eb, n_prev),), "force": True}``; it is never
rewritten. If it stops decoding, the reader broke layout 1; if the writer stops reproducing it byte for byte,
the format changed (bump ``codec.VERSION`` and keep reading version 1).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tpde_hf.reference.codec as C
from tpde_hf.codec.registry import CodecContext
from tpde_hf.errors import TpdeFormatError
from tpde_hf.reference import load as L

FIXTURE = Path(__file__).parent / "fixtures" / "formats" / "ref-ord-v1.safetensors"
CASES = {"bf16_chunks": (16, 4), "bf16_ctx16x1": (16, 1), "fp16": (4, 4), "fp32": (1, 4), "bf16_1x1": (1, 1)}
INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(INT[t.dtype])


@pytest.fixture(scope="module")
def fixture() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE)


@pytest.mark.parametrize("case", sorted(CASES))
def test_layout_1_decodes_bit_exact_and_rewrites_byte_for_byte(case: str, fixture: dict, monkeypatch) -> None:
    ref, tuned, blob = (fixture[f"{case}.{p}"] for p in ("reference", "tuned", "blob"))
    h, _, _ = C.read_header(blob, "ref-ord", case)
    assert int(h[0]) == 1 and (int(h[9]), int(h[10])) == CASES[case]
    for serial in (True, False):  # the pool's single-thread kernel and the numba-threads one
        out = C.RefOrd().decode({"blob": blob}, CodecContext(case, ref, {"serial": serial}))
        assert out.dtype == tuned.dtype and out.shape == tuned.shape
        assert torch.equal(_bits(out), _bits(tuned))
    monkeypatch.setattr(C, "CHUNK", 1024)
    again = C.RefOrd().encode(tuned, CodecContext(case, ref, {"configs": (CASES[case],), "force": True}))["blob"]
    assert torch.equal(again, blob)


def test_layout_1_corruption_sweep(fixture: dict) -> None:
    """Seeded bit flips and truncations of the four-chunk blob: exact, or a TpdeFormatError naming the tensor."""
    ref, tuned, blob = (fixture[f"bf16_chunks.{p}"] for p in ("reference", "tuned", "blob"))
    rng = np.random.default_rng(20)
    raw = blob.numpy()
    errors = exact = 0
    for i in range(150):
        bad = raw.copy()
        if i % 3 == 2:
            bad = bad[: int(rng.integers(0, raw.size))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                j = int(rng.integers(0, raw.size))
                bad[j] ^= np.uint8(1 << int(rng.integers(0, 8)))
        try:
            ctx = CodecContext("layer.w", ref, {"serial": i % 2 == 0})
            out = C.RefOrd().decode({"blob": torch.from_numpy(bad)}, ctx)
        except TpdeFormatError as exc:
            assert "layer.w" in str(exc)
            errors += 1
            continue
        assert torch.equal(_bits(out), _bits(tuned))
        exact += 1
    assert errors > 100 and errors + exact == 150


def test_decode_tables_agree_with_the_frequencies() -> None:
    """Every slot of a context maps to the symbol whose [cum, cum + freq) holds it; symtab carries the value bits."""
    rng = np.random.default_rng(3)
    freq = np.zeros((4, C.K.N_SYM), np.int64)
    for row in freq:
        cuts = np.sort(rng.choice(np.arange(1, 4096), size=C.K.N_SYM - 1, replace=False))
        row[:] = np.diff(np.concatenate([[0], cuts, [4096]]))
    freq[2] = 0
    freq[2, 5] = 4096  # a context with a single symbol
    ctxtab, symlut, fctab, symtab = C.decode_tables(freq, 12, 2, 2, 120, 0xFF)
    cum = np.cumsum(freq, axis=1) - freq
    for ctx in range(4):
        for slot in range(0, 4096, 7):
            s = int(symlut[(ctx << 12) + slot])
            assert cum[ctx, s] <= slot < cum[ctx, s] + freq[ctx, s]
            ent = int(fctab[ctx * 128 + s])
            assert (ent & 0x1FFF, ent >> 13) == (freq[ctx, s], cum[ctx, s])
    assert list(ctxtab[[0, 119, 120, 121, 255]] >> 12) == [0, 0, 0, 2, 2]  # exponent bucket x n_prev
    for s, u in ((3, 3), (16, 16), (17, 24), (18, 32), (19, 48)):  # u below 16 is the symbol, else top bits
        assert int(symtab[s]) >> 22 == u


def test_early_start_is_off_for_dense_repos_and_swallows_errors(tmp_path: Path) -> None:
    """The quantizer's early hooks do nothing without a reference; a prefetch that cannot start turns itself off
    (the loading thread then reports the problem clearly)."""

    class Q:
        quantization_config = type("Cfg", (), {"reference": None})()

    threads = threading.active_count()
    L.warm_up_reference_decode(Q())
    L.start_reference_prefetch(Q())
    assert threading.active_count() == threads and not hasattr(Q, "_tpde_prefetch")

    q = Q()
    q.quantization_config = type("Cfg", (), {"reference": {"model": str(tmp_path), "tensors": []}})()
    q._tpde_checkpoint_files = [str(tmp_path / "missing.safetensors")]
    L.start_reference_prefetch(q)
    pf = L.load_prefetch(q)  # the files are read on the prefetch's own thread: it then serves nothing
    assert pf is None or pf.take(np.zeros(8, np.int64)) is None
    for t in threading.enumerate():
        if t.name.startswith("tpde-ref"):
            t.join(timeout=30)
    assert threading.active_count() == threads
