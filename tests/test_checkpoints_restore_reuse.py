"""Restore speed work, part two (issue 21): compact rANS tables, reused buffers, the collector paused.

Covers: :func:`tpde_hf.checkpoints.dec_kernels.slot_table32` entries naming the same frequency, offset, symbol bits
and raw bit count as :func:`~tpde_hf.checkpoints.dec_kernels.slot_table`, and both tables decoding to the same bits
and the same per-chunk flags, clean and corrupt; the checks on a compact table's symbol table; a thread's block
buffers reused across tensors of other sizes; decoding into a spare array (dirty, or unusable and then ignored);
a chain reusing a let-go link's arrays and still restoring exactly; and the cyclic collector paused during a
decode and restored after it, on success and on failure.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import pytest
import torch
from test_checkpoints_restore import MK, VK, WK, _adam_pair, _chain_run, _encode_like_a_pack, _special

from tpde_hf.checkpoints import api, chain
from tpde_hf.checkpoints import dec_features as F
from tpde_hf.checkpoints import dec_kernels as D
from tpde_hf.checkpoints import kernels as K
from tpde_hf.checkpoints import store as S
from tpde_hf.checkpoints.codec import CheckpointDelta, _as_dtype_bits, _buckets, predict
from tpde_hf.codec.registry import TENSOR_CODECS, CodecContext
from tpde_hf.errors import TpdeFormatError

CODEC = TENSOR_CODECS.get("ckpt-delta")
_MB = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}
_INT = {torch.float32: np.int32, torch.bfloat16: np.int16, torch.float16: np.int16}
INT_T = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _coded(dtype: torch.dtype, mode: int, n: int, seed: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    old, new = _special(n, dtype, seed)
    return CODEC.encode(new, CodecContext("t", old, {"modes": (mode,)})), old, new


def _inputs(parts: dict, old: torch.Tensor) -> tuple:
    """``(pp, prediction bits, context buckets, decoder inputs)`` of a coded tensor against ``old``."""
    pp = CheckpointDelta._parse(parts, "t")
    dtype = pp["dtype"]
    refn = old.reshape(-1).float().numpy() if dtype == torch.bfloat16 else old.reshape(-1).numpy()
    ctx = _buckets(CheckpointDelta._ctx_source(refn, CodecContext("t", old, {}), dtype, pp["n"]), pp["lo"],
                   pp["n_ctx"])
    npf = np.float32 if dtype != torch.float16 else np.float16
    p = _as_dtype_bits(predict(refn, pp["coef"], [], pp["n"], np.dtype(npf)), dtype)
    return pp, p, ctx, CheckpointDelta._decoder_inputs(pp, tables=False)[2:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", [K.MODE_ORD, K.MODE_FLD])
def test_compact_table_entries_name_what_the_wide_ones_do(dtype: torch.dtype, mode: int) -> None:
    parts, _, _ = _coded(dtype, mode, 9001, seed=mode)
    pp = CheckpointDelta._parse(parts, "t")
    wide = D.slot_table(pp["freq"], mode, _MB[dtype])
    tab, sym = D.table(pp["freq"], mode, _MB[dtype])
    if pp["nsym"] > D.SYMS32:  # float32's sign-and-exponent mode: the wide table, unchanged
        assert tab.dtype == np.int64 and np.array_equal(tab, wide)
        return
    assert tab.dtype == np.uint32 and tab.shape == wide.shape and sym.shape == (D.SYMS32,)
    e = tab.astype(np.int64)
    s = e >> 24
    assert np.array_equal((e & 0xFFF) + 1, (wide >> 32) & 0x1FFF)  # frequency
    assert np.array_equal((e >> 12) & 0xFFF, (wide >> 45) & 0xFFF)  # slot - cum
    assert np.array_equal(sym[s] >> 57, wide >> 57)  # raw bit count
    assert np.array_equal(sym[s] & 0xFFFFFFFF, wide & 0xFFFFFFFF)  # the symbol's bits above its raw bits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compact_table_decodes_as_the_wide_one_clean_and_corrupt(dtype: torch.dtype) -> None:
    rng = np.random.default_rng(11)
    parts, old, new = _coded(dtype, K.MODE_ORD, 3 * (1 << 15) + 77, seed=5)
    width = 32 if dtype == torch.float32 else 16
    for case in range(16):
        bad = {k: v.clone() for k, v in parts.items()}
        if case:  # case 0 clean, then one flipped bit in the payload or the chunk table
            name = ["words", "bits", "chunks"][case % 3]
            buf = bad[name].view(torch.uint8).reshape(-1).numpy()
            buf[rng.integers(buf.size)] ^= np.uint8(1 << rng.integers(8))
        try:
            pp, p, ctx, (ws, w, bs, b, st) = _inputs(bad, old)
        except TpdeFormatError:
            continue
        outs, flags = [], []
        for tab, sym in (D.table(pp["freq"], pp["mode"], _MB[dtype]), (D.slot_table(pp["freq"], pp["mode"],
                                                                                    _MB[dtype]), None)):
            for serial in (True, False):
                out = np.empty(pp["n"], _INT[dtype])
                flags.append(D.decode_bits(p, ctx, tab, st, ws, w, bs, b, pp["mode"], width, pp["chunk"], out,
                                           parallel=not serial, sym=sym))
                outs.append(out)
        assert all(np.array_equal(f, flags[0]) for f in flags), case
        ch = pp["chunk"]
        for c in np.flatnonzero(flags[0] == 0):  # a chunk that ends as encoded: the same bits from every run
            assert all(np.array_equal(o[c * ch:(c + 1) * ch], outs[0][c * ch:(c + 1) * ch]) for o in outs), case
        if case == 0:
            assert not flags[0].any() and np.array_equal(outs[0], new.view(INT_T[dtype]).numpy())


def test_a_compact_table_needs_its_symbol_table() -> None:
    parts, old, _ = _coded(torch.float32, K.MODE_ORD, 5000, seed=1)
    pp, p, ctx, (ws, w, bs, b, st) = _inputs(parts, old)
    tab, sym = D.table(pp["freq"], pp["mode"], 23)
    out = np.empty(pp["n"], np.int32)
    for wrong in (None, sym[:-1], sym.astype(np.int32)):
        with pytest.raises(ValueError, match="symbol table"):
            D.decode_bits(p, ctx, tab, st, ws, w, bs, b, pp["mode"], 32, pp["chunk"], out, sym=wrong)
    with pytest.raises(ValueError, match="symbol table"):
        D.decode_bits(p, ctx, tab.view(np.int32), st, ws, w, bs, b, pp["mode"], 32, pp["chunk"], out, sym=sym)


def test_reused_block_buffers_carry_nothing_between_tensors() -> None:
    """One thread decodes a large tensor, then smaller ones of other sizes and dtypes, into its reused block
    buffers: every one exact (a stale buffer entry would show as a wrong value or a bad chunk)."""
    with K.serial(True):
        for n, dtype, mode in ((70001, torch.float32, K.MODE_ORD), (1, torch.float32, K.MODE_ORD),
                               (4099, torch.bfloat16, K.MODE_FLD), (20000, torch.float32, K.MODE_FLD),
                               (3, torch.float16, K.MODE_ORD), (70001, torch.float32, K.MODE_ORD)):
            parts, old, new = _coded(dtype, mode, n, seed=n)
            got = CODEC.decode(parts, CodecContext("t", old, {}))
            assert torch.equal(got.view(INT_T[dtype]), new.view(INT_T[dtype])), (n, dtype, mode)


def test_decoding_into_a_spare_array() -> None:
    a, b = _adam_pair(4099, seed=6)
    parts = _encode_like_a_pack(b, a, False)
    cur = {MK: b[MK], VK: b[VK]}
    dirty = np.full(4099, -1, np.int32)  # every element is written: nothing of it may show
    got = F.decode(WK, parts[WK], cur, a, ["w"], spare=lambda n: dirty)
    assert got is not None and torch.equal(got.view(torch.int32), b[WK].view(torch.int32))
    assert got.data_ptr() == dirty.ctypes.data  # decoded into the spare
    for unusable in (np.zeros(4098, np.int32), np.zeros(4099, np.float32), np.zeros(8198, np.int32)[::2]):
        got = F.decode(WK, parts[WK], cur, a, ["w"], spare=lambda n, u=unusable: u)
        assert got is not None and got.data_ptr() != unusable.ctypes.data
        assert torch.equal(got.view(torch.int32), b[WK].view(torch.int32))


def test_a_chain_reuses_let_go_links_and_stays_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, hashes = _chain_run(tmp_path)
    root = out / S.STORE_DIRNAME
    paths, raw = S.links(root, "checkpoint-10")
    start = S.read_checkpoint(raw, name=S.raw_name(root, raw), hash_files=False)
    taken: list[int] = []
    real = chain.ChainDecode._take

    def counted(self, n):  # noqa: ANN001, ANN202
        got = real(self, n)
        if got is not None:
            got.fill(-1)  # whatever a spare held, the decode overwrites it
            taken.append(n)
        return got

    monkeypatch.setattr(chain.ChainDecode, "_take", counted)
    by_link = start
    for p in paths:
        by_link = chain.decode_links([p], by_link, threads=1)
    with K.serial(True):  # one thread: link by link in order, so every link after the second finds spares
        graph = chain.decode_links(paths, start, threads=1)
    assert len(taken) >= 3 * (len(paths) - 2)  # the Adam tensors of links 3 and 4
    for k, t in graph.tensors.items():
        assert torch.equal(t.view(INT_T[t.dtype]), by_link.tensors[k].view(INT_T[t.dtype])), k
    for f in graph.manifest["files"]:
        S.file_digest(graph, f["name"])
    assert chain.decode_links(paths, start, threads=2).tensors.keys() == graph.tensors.keys()


@pytest.mark.parametrize("enabled", [True, False])
def test_the_collector_is_paused_while_decoding_and_restored_after(tmp_path: Path, enabled: bool,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    out, hashes = _chain_run(tmp_path)
    root = out / S.STORE_DIRNAME
    paths, raw = S.links(root, "checkpoint-20")
    start = S.read_checkpoint(raw, name=S.raw_name(root, raw), hash_files=False)
    seen: list[bool] = []
    real = chain.ChainDecode._decode

    def watched(self, *args):  # noqa: ANN001, ANN202
        seen.append(gc.isenabled())
        return real(self, *args)

    monkeypatch.setattr(chain.ChainDecode, "_decode", watched)
    was = gc.isenabled()
    try:
        (gc.enable if enabled else gc.disable)()
        chain.decode_links(paths, start, threads=2)
        assert seen and not any(seen) and gc.isenabled() == enabled
        entry = root / "checkpoint-30.tpde"
        data = bytearray(entry.read_bytes())
        data[-200] ^= 0x04
        entry.write_bytes(bytes(data))
        with pytest.raises(TpdeFormatError, match="checkpoint-30"):
            api.restore(out / "checkpoint-20", out=tmp_path / "restored")
        assert gc.isenabled() == enabled
        with pytest.raises(TpdeFormatError):
            chain.decode_links([tmp_path / "missing.tpde"], start)  # fails while the links are read
        assert gc.isenabled() == enabled
    finally:
        (gc.enable if was else gc.disable)()
