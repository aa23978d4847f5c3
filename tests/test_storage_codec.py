"""The ``narrow-rans`` storage codec: bit-exact round trips, the exact resident base, corruption sweeps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tpde_hf.codec import base_quant
from tpde_hf.codec.ordinal import INT_VIEW
from tpde_hf.codec.registry import BASE_STORAGE, BaseStorage, CodecContext
from tpde_hf.codec.storage import NarrowRans, bins
from tpde_hf.codec.storage import codec as storage_codec
from tpde_hf.codec.storage.blob import unpack_blob
from tpde_hf.errors import TpdeFormatError

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
CODEC = NarrowRans()


def _ctx(name: str = "layer.weight") -> CodecContext:
    return CodecContext(name)


def _iv(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(INT_VIEW[t.dtype])


def _base(w: torch.Tensor, g: int = 128) -> dict[str, torch.Tensor]:
    b = base_quant.quantize(w, g)
    return {"qweight": b.qweight, "scales": b.scales, "zeros": b.zeros}


def _n_exceptions(parts: dict[str, torch.Tensor]) -> int:
    (_, _, n_exc, _), _ = unpack_blob(parts["delta_blob"], storage_codec._DELTA, 3, "t")
    return n_exc


def _special(dtype: torch.dtype, shape: tuple[int, int], seed: int) -> torch.Tensor:
    """Random weights with +-0, subnormals, inf/NaN (several payloads), outliers, a constant group."""
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    flat = w.view(-1)
    n = flat.numel()
    idx = torch.randperm(n, generator=gen)
    tiny = torch.finfo(dtype).tiny
    specials = [0.0, -0.0, tiny / 4, -tiny / 8, float("inf"), float("-inf"), float("nan"), 3e4, -5e3, 1e-30]
    for j, v in enumerate(specials[: n // 4]):
        flat[idx[j]] = torch.tensor(v, dtype=torch.float32).to(dtype)
    if n > 40:  # a NaN with another payload, bit by bit
        iv = _iv(w).view(-1)
        iv[idx[len(specials)]] = iv.new_tensor(0x7FC1 if iv.dtype == torch.int16 else 0x7FC00123)
        iv[idx[len(specials) + 1]] = iv.new_tensor(-2 if iv.dtype == torch.int16 else -5)  # negative NaN
    if shape[1] >= 128:
        w[0, :128] = w[0, 5]  # a constant group
    return w


def _roundtrip(w: torch.Tensor, g: int = 128) -> dict[str, torch.Tensor]:
    base = _base(w, g)
    parts = CODEC.encode(w, base, _ctx())
    assert set(parts) == {"base_blob", "delta_blob"}
    back = CODEC.decode(parts, _ctx())
    assert back.dtype == w.dtype and back.shape == w.shape
    assert torch.equal(_iv(back), _iv(w))
    got = CODEC.decode_base({k: v for k, v in parts.items() if k.startswith("base_")}, _ctx())
    for key in ("qweight", "zeros"):
        assert torch.equal(got[key], base[key]), key
    assert torch.equal(_iv(got["scales"]), _iv(base["scales"]))
    return parts


def test_registered_as_base_storage():
    import tpde_hf.codec.storage  # noqa: F401

    codec = BASE_STORAGE.get("narrow-rans")
    assert isinstance(codec, NarrowRans) and isinstance(codec, BaseStorage)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 77), (3, 200), (5, 129), (16, 384), (1, 1)])
def test_roundtrip_special_values(dtype, shape):
    _roundtrip(_special(dtype, shape, seed=shape[0] * 1000 + shape[1]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", [32, 64])
def test_roundtrip_group_sizes(dtype, g):
    _roundtrip(_special(dtype, (7, 3 * g + 5), seed=g))


def _outside_bins(w: torch.Tensor) -> int:
    """Weights whose code is not ``rint(w / s) + zero`` (clamped codes, non-finite values), by torch."""
    b = base_quant.quantize(w, 128)
    out_f, in_f = w.shape
    ng = b.scales.shape[1]
    q = base_quant.unpack_nibbles(b.qweight, in_f).int()
    z = base_quant.unpack_nibbles(b.zeros, ng).int().repeat_interleave(128, 1)[:, :in_f]
    s = b.scales.float().repeat_interleave(128, 1)[:, :in_f]
    return int(((torch.round(w.float() / s) + z) != q).sum())


@pytest.mark.parametrize("dtype", DTYPES)
def test_exceptions_are_exactly_the_weights_outside_their_bin(dtype):
    """The kernel's bin edges follow the quantizer's rounding exactly: its exceptions are the clamped codes
    and the non-finite values that torch finds, no more."""
    w = (torch.randn(64, 384, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    assert _n_exceptions(_roundtrip(w)) == _outside_bins(w)
    bad = w.clone()
    bad[3, 7] = float("nan")
    bad[9, 100] = float("inf")
    assert _n_exceptions(_roundtrip(bad)) == _outside_bins(bad) >= 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_degenerate_groups(dtype):
    """All-zero rows, underflowing ranges (fallback scale), one huge outlier, sign-only groups."""
    w = torch.zeros(6, 256, dtype=dtype)
    w[1] = torch.finfo(dtype).tiny / 2  # subnormal (bf16/fp32) or below the fp16 scale's resolution
    w[2, 3] = torch.finfo(dtype).max / 2
    w[3] = -torch.rand(256, generator=torch.Generator().manual_seed(2)).to(dtype)
    w[4] = -0.0
    w[5, ::2] = 1.0
    _roundtrip(w)


def test_lower_edge_is_the_quantizer_boundary():
    """``lower_edge(k)`` is the first ordinal whose level (``rint(w / s)`` in float32) reaches ``k``."""
    lut = storage_codec.value_lut(torch.bfloat16)
    u32 = np.zeros(1, dtype=np.uint32)
    f32 = u32.view(np.float32)
    for s in (np.float32(0.0101), np.float32(2.0**-24), np.float32(3.5)):
        for k in range(-15, 17):
            o = bins.lower_edge(k, s, 16, 7, 0, lut, u32, f32)
            vals = torch.tensor([o, o - 1], dtype=torch.int64)
            w = storage_codec.torch.from_numpy(
                (vals ^ ((vals >> 15) & 0x7FFF)).numpy().astype(np.int16)).view(torch.bfloat16).float()
            lv = torch.round(w / torch.tensor(s))
            assert lv[0] >= k and not lv[1] >= k, (s, k)


@pytest.mark.parametrize(("src", "dtype", "tz"), [(torch.float16, torch.float32, 13),
                                                  (torch.bfloat16, torch.float32, 16),
                                                  (torch.bfloat16, torch.float16, 0)])
def test_coarse_grid_tensors(src, dtype, tz):
    """Weights that came from a narrower format are coded on its grid: fewer bits, still exact."""
    w = (torch.randn(32, 256, generator=torch.Generator().manual_seed(5)) * 0.02).to(src).to(dtype)
    w[0, 0] = -0.0
    w[1, 1] = float("inf")
    bits = w.view(INT_VIEW[dtype]).numpy().ravel()
    width, mb, _ = storage_codec._geometry(dtype)
    assert storage_codec.grid_bits(bits, width, mb) == tz
    parts = _roundtrip(w)
    noisy = w + torch.randn(w.shape, generator=torch.Generator().manual_seed(6)).to(dtype) * 1e-7
    if tz:
        assert sum(p.numel() for p in parts.values()) < sum(p.numel() for p in _roundtrip(noisy).values())
    odd = w.clone().view(INT_VIEW[dtype])
    odd[2, 2] = odd.new_tensor(0x7FC1 if dtype == torch.float16 else 0x7FC00001)  # NaN off the grid
    _roundtrip(odd.view(dtype))


def test_grid_bits_edge_cases():
    f32 = torch.tensor([0.5, 0.25, float("nan")]).view(torch.int32).numpy()
    assert storage_codec.grid_bits(f32, 32, 23) == 23
    assert storage_codec.grid_bits(torch.zeros(4).view(torch.int32).numpy(), 32, 23) == 23
    assert storage_codec.grid_bits(torch.tensor([1.0 + 2**-23]).view(torch.int32).numpy(), 32, 23) == 0


def test_bad_inputs_raise_clear_errors():
    w = torch.randn(4, 64).to(torch.bfloat16)
    with pytest.raises(ValueError, match="layer.weight"):
        CODEC.encode(w.view(-1), _base(w, 32), _ctx())
    with pytest.raises(ValueError, match="resident layout"):
        CODEC.encode(w, _base(w[:, :32], 32), _ctx())
    with pytest.raises(TpdeFormatError, match="base_blob"):
        CODEC.decode_base({}, _ctx())
    parts = CODEC.encode(w, _base(w, 32), _ctx())
    with pytest.raises(TpdeFormatError, match="delta_blob"):
        CODEC.decode({"base_blob": parts["base_blob"]}, _ctx())
    with pytest.raises(TpdeFormatError, match="layer.weight"):
        CODEC.decode_base({"base_blob": parts["base_blob"].to(torch.int16)}, _ctx())


def _cases(blob: torch.Tensor, rng: np.random.Generator, n_flips: int, n_cuts: int):
    data = blob.numpy()
    for _ in range(n_flips):
        bad = data.copy()
        for _ in range(int(rng.integers(1, 4))):
            pos = int(rng.integers(0, bad.size))
            bad[pos] ^= np.uint8(1 << int(rng.integers(0, 8)))
        yield "flip", torch.from_numpy(bad)
    for _ in range(n_cuts):
        yield "cut", torch.from_numpy(data[: int(rng.integers(0, data.size))].copy())


@pytest.mark.parametrize("dtype", DTYPES)
def test_corruption_sweep(dtype):
    """Every flipped or truncated part either decodes exactly or raises TpdeFormatError naming the tensor.

    No case may decode silently wrong: the base carries an xxh3 checksum of the resident base (and of the
    header fields it depends on), the delta one of the weight, and the rANS streams must end on their
    initial state with every word read. A flip that only touches a checksum field itself is caught by the
    comparison. Every part of this format is covered by one of these checks, so no case is left to the
    repository's file-level integrity hash.
    """
    w = _special(dtype, (6, 300), seed=7)
    base = _base(w)
    parts = CODEC.encode(w, base, _ctx())
    rng = np.random.default_rng(18)
    outcomes = {"exact": 0, "error": 0}
    for part in ("base_blob", "delta_blob"):
        for _, bad in _cases(parts[part], rng, n_flips=60, n_cuts=20):
            broken = {**parts, part: bad}
            try:
                back = CODEC.decode(broken, _ctx("model.layers.0.mlp.up_proj.weight"))
            except TpdeFormatError as exc:
                assert "model.layers.0.mlp.up_proj.weight" in str(exc)
                outcomes["error"] += 1
                continue
            assert torch.equal(_iv(back), _iv(w))
            outcomes["exact"] += 1
            if part == "base_blob":
                got = CODEC.decode_base(broken, _ctx())
                assert all(torch.equal(got[k].view(torch.uint8), base[k].view(torch.uint8)) for k in base)
    assert outcomes["error"] >= 150  # nearly every case is caught, none is wrong


def test_base_mode_reads_only_base_parts():
    """A corrupt delta never disturbs decode_base; decode then refuses it."""
    w = (torch.randn(8, 256) * 0.02).to(torch.bfloat16)
    parts = CODEC.encode(w, _base(w), _ctx())
    junk = torch.zeros_like(parts["delta_blob"])
    got = CODEC.decode_base({"base_blob": parts["base_blob"], "delta_blob": junk}, _ctx())
    assert torch.equal(got["qweight"], _base(w)["qweight"])
    with pytest.raises(TpdeFormatError):
        CODEC.decode({"base_blob": parts["base_blob"], "delta_blob": junk}, _ctx())


def test_multi_block_tensor_threads_agree(monkeypatch):
    """A tensor of several rANS blocks round-trips, and 1 or 2 threads write the same bytes."""
    w = (torch.randn(3, 50000, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    monkeypatch.setenv("TPDE_CODEC_THREADS", "1")
    one = _roundtrip(w)
    monkeypatch.setenv("TPDE_CODEC_THREADS", "2")
    two = _roundtrip(w)
    assert all(torch.equal(one[k], two[k]) for k in one)


@pytest.mark.parametrize("dtype", DTYPES)
def test_bins_built_once_for_exactly_the_levels_in_use(dtype, monkeypatch):
    """``_bins`` builds the bin of every (scale, level) that q uses and no other, on 1 or 2 threads alike; a
    one-symbol bin's unused segments start at 2**PB (the decoder's branch-free segment search)."""
    w = _special(dtype, (40, 300), seed=11)
    b = base_quant.quantize(w, 128)
    in_f, ng = w.shape[1], b.scales.shape[1]
    q = np.ascontiguousarray(base_quant.unpack_nibbles(b.qweight, in_f).numpy())
    z = np.ascontiguousarray(base_quant.unpack_nibbles(b.zeros, ng).numpy())
    uscales, sids = storage_codec._scale_ids(b.scales.numpy())
    width, mb, lut = storage_codec._geometry(dtype)
    caches = []
    for threads in ("1", "2"):
        monkeypatch.setenv("TPDE_CODEC_THREADS", threads)
        caches.append(storage_codec._bins(q, z, sids, uscales, 7, width, mb, 0, lut))
    used = np.zeros((uscales.size, bins.NLEV), dtype=bool)
    levels = q.astype(np.int64) - np.repeat(z, 128, axis=1)[:, :in_f] + 15
    used[np.repeat(sids, 128, axis=1)[:, :in_f], levels] = True
    one, two = caches
    assert np.array_equal(one[2], used) and np.array_equal(two[2], used)
    assert np.array_equal(one[4], two[4]) and np.array_equal(one[4][~used], np.zeros(int((~used).sum())))
    kinds = np.where(one[8], bins.ONE, np.where(one[4] > 0, bins.MULTI, bins.EMPTY))
    assert np.array_equal(one[10], kinds) and np.array_equal(two[10], kinds)
    for u, li in zip(*np.nonzero(one[8]), strict=True):  # one-symbol bins: their records
        r = (u * bins.NLEV + li) * bins.REC
        n = one[4][u, li]
        rec = one[9][r: r + bins.REC]
        assert np.array_equal(rec, two[9][r: r + bins.REC])
        cum = np.concatenate(([0], rec[1:4], [1 << bins.PB]))  # CUM0..3, then the end
        uf, st, cnt = rec[4:8], rec[12:16], rec[16:20]
        assert (cum[n:4] == 1 << bins.PB).all() and (cum[: n + 1] == np.sort(cum[: n + 1])).all()
        fr = uf[:n] * cnt[:n] + np.array([rec[0]] + [0] * (n - 1))
        assert fr.sum() == 1 << bins.PB and np.array_equal(np.diff(cum[: n + 1]), fr)
        assert (uf[:n] >= 1).all() and np.array_equal(rec[8:8 + n], (1 << 32) // uf[:n] + 1)  # reciprocals
        L, H = one[3][u, li]
        assert cnt[:n].sum() == H - L + 1 and st[:n].min() == L and (st[:n] + cnt[:n]).max() == H + 1
