"""The checkpoint codec's fast encoder (``tpde_hf.checkpoints.enc_kernels``) and its pack-time checks.

* the rANS encoder writes exactly the stream of the previous kernel (``kernels.encode_chunks``), as stored, which the
  unchanged decoder reads: any chunk size, tail lengths, both modes, random tables;
* the decoder's inverse of the symbol map holds for every 16-bit pattern against special predictions
  (exhaustive for bf16/fp16) and for special fp32 values;
* the inline checks refuse a wrong symbol or a table without mass for a present symbol, anywhere in the
  tensor (not only in the chunks the verify decodes), so nothing is stored;
* a payload corrupted after the verify still never decodes to a wrong tensor (the checksum);
* version-2 entries written by the previous encoder (fixture ``ckpt-backward-v2``) restore byte for byte.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import xxhash

from tpde_hf.checkpoints import api
from tpde_hf.checkpoints import backward as B
from tpde_hf.checkpoints import codec as C
from tpde_hf.checkpoints import enc_kernels as E
from tpde_hf.checkpoints import kernels as K
from tpde_hf.checkpoints import store as S
from tpde_hf.codec.registry import TENSOR_CODECS, CodecContext
from tpde_hf.errors import TpdeFormatError


def _tables(sym: np.ndarray, ctx: np.ndarray, n_ctx: int, nsym: int) -> tuple[np.ndarray, np.ndarray]:
    freq = C.CheckpointDelta._tables(K.histogram(sym, ctx, n_ctx, nsym))
    return freq, (np.cumsum(freq, 1) - freq).astype(np.int64)


@pytest.mark.parametrize("mode", [K.MODE_ORD, K.MODE_FLD])
@pytest.mark.parametrize("n,chunk", [(0, 8), (1, 8), (7, 4), (1003, 16), (50_001, 1 << 15), (70_000, 1 << 19)])
def test_encoder_writes_the_previous_kernels_stream(mode: int, n: int, chunk: int) -> None:
    rng = np.random.default_rng(n + mode)
    x = (rng.standard_normal(n).astype(np.float32) * np.float32(rng.uniform(1e-6, 10))).view(np.int32)
    p = (x.view(np.float32) + rng.standard_normal(n).astype(np.float32) * np.float32(1e-4)).view(np.int32)
    ctx = rng.integers(0, 5, n).astype(np.uint8)
    nsym = K.n_symbols(mode, 32, 23)
    sym, nraw, raw = K.symbolize(x, p, mode, 32, 23)
    freq, cum = _tables(sym, ctx, 5, nsym)
    for serial in (True, False):
        with K.serial(serial):
            old = K.encode_chunks(sym, nraw, raw, ctx, freq, cum, chunk)
            compact = E.encode_compact(sym, nraw, raw, ctx, freq, cum, chunk)
        assert compact[5] == 0
        for a, c in zip(old[:3], compact[:3], strict=True):
            assert np.array_equal(a, c)
        # the stored streams: every chunk's words, then every chunk's bit words, one after the other
        cap = old[3].shape[1]
        words = [old[3][c, cap - old[1][c]:] for c in range(len(old[0]))]
        bitwords = [old[4][c, :old[2][c]] for c in range(len(old[0]))]
        assert np.array_equal(compact[3], np.concatenate(words) if words else np.zeros(0, np.uint16))
        assert np.array_equal(compact[4], np.concatenate(bitwords) if bitwords else np.zeros(0, np.uint32))
        assert compact[3].dtype == np.uint16 and compact[4].dtype == np.uint32


@pytest.mark.parametrize("width,mb", [(16, 7), (16, 10)])
def test_symbol_map_inverse_every_16_bit_pattern(width: int, mb: int) -> None:
    x = np.arange(-(1 << 15), 1 << 15, dtype=np.int64).astype(np.int16)
    specials = [0, -(1 << 15), 1, -1, 0x7F80 if mb == 7 else 0x7C00, 0x7FFF, 0x3F80 if mb == 7 else 0x3C00]
    for pv in specials:
        p = np.full(x.size, pv, np.int64).astype(np.int16)
        for mode in (K.MODE_ORD, K.MODE_FLD):
            sym, _, raw = K.symbolize(x, p, mode, width, mb)
            assert E.unsymbolize_check(x, p, sym, raw, mode, width, mb) == 0


def test_symbol_map_inverse_fp32_specials() -> None:
    vals = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1e-40, -3.4e38, 3.4e38, 1.0, -1.0],
                    np.float32).view(np.int32)
    x = np.concatenate([vals, np.array([-1, 1, np.iinfo(np.int32).min, np.iinfo(np.int32).max], np.int32)])
    xs, ps = np.meshgrid(x, x)
    xs, ps = xs.reshape(-1).copy(), ps.reshape(-1).copy()
    for mode in (K.MODE_ORD, K.MODE_FLD):
        sym, _, raw = K.symbolize(xs, ps, mode, 32, 23)
        assert E.unsymbolize_check(xs, ps, sym, raw, mode, 32, 23) == 0


def test_rans_inverse_check_refuses_a_symbol_without_mass() -> None:
    rng = np.random.default_rng(0)
    sym = rng.integers(0, 4, 1000).astype(np.uint16)
    ctx = np.zeros(1000, np.uint8)
    nraw, raw = np.zeros(1000, np.uint8), np.zeros(1000, np.uint32)
    freq = np.array([[2048, 1024, 1024, 0]], np.int64)  # symbol 3 occurs but has no mass
    cum = (np.cumsum(freq, 1) - freq).astype(np.int64)
    with K.serial(True):
        assert E.encode_compact(sym, nraw, raw, ctx, freq, cum, 64)[5] > 0
    raw[5] = 4  # more bits than the symbol says
    sym[sym == 3] = 0
    with K.serial(True):
        assert E.encode_compact(sym, nraw, raw, ctx, freq, cum, 64)[5] > 0
    over = np.array([[4096, 1, 0, 0]], np.int64)  # more than 2**12 in all
    with pytest.raises(ValueError, match="tables"):
        E.encode_compact(sym, nraw, raw, ctx, over, (np.cumsum(over, 1) - over).astype(np.int64), 64)


def test_a_payload_corrupted_after_the_verify_never_decodes_wrong() -> None:
    g = torch.Generator().manual_seed(6)
    ref = torch.randn(40 * C.CHUNK + 77, generator=g)
    new = ref + 1e-4 * torch.randn(ref.shape, generator=g)
    codec = TENSOR_CODECS.get("ckpt-delta")
    parts = codec.encode(new, CodecContext("w", ref, {"verify": True}))
    rng = np.random.default_rng(1)
    for _ in range(12):
        bad = dict(parts)
        name = ["words", "bits"][int(rng.integers(2))]
        b = parts[name].clone()
        b[int(rng.integers(b.numel()))] ^= int(1 << rng.integers(8))
        bad[name] = b
        with pytest.raises(TpdeFormatError, match="w"):
            codec.decode(bad, CodecContext("w", ref))


FIXTURE = Path(__file__).parent / "fixtures" / "formats" / "ckpt-backward-v2"


def test_backward_fixture_restores_bit_exactly(tmp_path: Path) -> None:
    """Version-2 entries written by the previous encoder (commit 403620e) restore byte for byte, the current
    encoder packs the same checkpoints again, and a corrupted entry is a clear error."""
    out = tmp_path / "run"
    shutil.copytree(FIXTURE / "run", out)
    want = json.loads((FIXTURE / "expected_xxh3.json").read_text())
    mans = dict(S.entries(out / S.STORE_DIRNAME))
    assert {n: (m["parent"], m["version"]) for n, m in mans.items()} == {
        "checkpoint-1": ("checkpoint-2", 2), "checkpoint-2": ("checkpoint-3", 2), "checkpoint-3": (None, 2)}

    def restored(d: Path, dst: Path) -> dict[str, str]:
        api.restore(d, out=dst)
        return {p.name: xxhash.xxh3_64_hexdigest(p.read_bytes()) for p in sorted(dst.iterdir())
                if p.name != S.POINTER}

    for name, hashes in want.items():
        got = restored(out / name, tmp_path / "restored" / name)
        assert {k: v for k, v in got.items() if k in hashes} == hashes
    again = tmp_path / "again"  # the same checkpoints through the current encoder, as the callback packs them
    cache = None
    for name in want:
        shutil.copytree(tmp_path / "restored" / name, again / name)
        (again / name / S.POINTER).unlink(missing_ok=True)
        _, cache = B.advance(again / name, keyframe_every=3, param_names=["w"], cache=cache)
    for name, hashes in want.items():
        got = restored(again / name, tmp_path / "restored2" / name)
        assert {k: v for k, v in got.items() if k in hashes} == hashes
    entry = out / S.STORE_DIRNAME / "checkpoint-2.tpde"
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0x10
    entry.write_bytes(bytes(data))
    with pytest.raises(TpdeFormatError, match="checkpoint-2"):
        api.restore(out / "checkpoint-1", out=tmp_path / "bad")
