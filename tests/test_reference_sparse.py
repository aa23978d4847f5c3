"""``ref-sparse`` (changed positions as gaps + their values) and the delta conversion choosing it, bit-exact."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_reference import _tiny, bits_equal, pair, sweep_blob

import tpde_hf.reference  # noqa: F401  (registers the codecs lazily)
from tpde_hf.codec.registry import TENSOR_CODECS, CodecContext
from tpde_hf.errors import TpdeFormatError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def sparse_pair(dtype: torch.dtype, shape: tuple[int, ...], positions: list[int], seed: int = 0):
    """A base and a fine-tune that differs exactly at ``positions`` (flat indices; negative from the end)."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.randn(shape, generator=g) * 0.02).to(dtype).contiguous()
    tuned = base.clone()
    flat = tuned.view(-1).view(INT[dtype])
    for p in positions:
        flat[p] = flat[p] + (1 if int(flat[p]) % 7 else -3)  # a few ulps: always a different bit pattern
    return base, tuned


def round_trip(base: torch.Tensor, tuned: torch.Tensor) -> dict[str, torch.Tensor]:
    codec = TENSOR_CODECS.get("ref-sparse")
    parts = codec.encode(tuned, CodecContext("w", base, {"force": True}))
    assert parts is not None
    assert bits_equal(codec.decode(parts, CodecContext("w", base)), tuned)
    return parts


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 65), (3, 5, 7), (70_001,)])
def test_ref_sparse_round_trip_is_bit_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    base, tuned = pair(dtype, shape, seed=shape[0], frac=0.02)  # ±0, subnormals, inf, NaN payloads on both sides
    round_trip(base, tuned)
    n = tuned.numel()
    for positions in ([0], [n - 1], [0, n - 1], list(range(0, n, 3))):  # first / last element, a regular pattern
        round_trip(*sparse_pair(dtype, shape, sorted(set(positions))))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_ref_sparse_none_and_all_changed(dtype: torch.dtype) -> None:
    base, _ = sparse_pair(dtype, (41, 3), [])
    parts = round_trip(base, base.clone())  # nothing changed: header and empty streams only
    assert parts["blob"].numel() < 400
    _, every = sparse_pair(dtype, (41, 3), list(range(123)))
    round_trip(base, every)
    # ±0 and NaN payloads: equal as floats, different as bits, so they count as changes
    z = torch.zeros(9, dtype=dtype)
    flipped = z.clone()
    flipped[4] = -0.0
    round_trip(z, flipped)
    nan = torch.full((9,), float("nan"), dtype=dtype)
    other = nan.clone()
    other.view(INT[dtype])[2] ^= 1
    round_trip(nan, other)


def test_ref_sparse_pays_only_where_few_entries_changed() -> None:
    codec = TENSOR_CODECS.get("ref-sparse")
    base, few = sparse_pair(torch.bfloat16, (256, 256), list(range(5, 65536, 997)))
    parts = codec.encode(few, CodecContext("w", base))
    assert parts is not None and parts["blob"].numel() < 0.01 * few.numel() * 2
    _, most = pair(torch.bfloat16, (256, 256), frac=0.9)
    assert codec.encode(most, CodecContext("w", base)) is None  # more than MAX_FRACTION changed: not tried


def test_ref_sparse_wrong_reference_and_corruption_sweep() -> None:
    """Flipped bits and truncations at seeded places: exact, or a TpdeFormatError naming the tensor."""
    base, tuned = pair(torch.bfloat16, (70_000,), seed=11, frac=0.05)
    codec = TENSOR_CODECS.get("ref-sparse")
    blob = codec.encode(tuned, CodecContext("layer.w", base))["blob"]
    other = base.clone()
    other.view(-1)[77] = other.view(-1)[77] * 2 + 0.5
    with pytest.raises(TpdeFormatError, match="checksum"):
        codec.decode({"blob": blob}, CodecContext("layer.w", other))
    with pytest.raises(TpdeFormatError, match="shape"):
        codec.decode({"blob": blob}, CodecContext("layer.w", base[:10]))
    outcomes = sweep_blob(codec, blob, base, tuned, seed=4321, n=150)
    assert outcomes["error"] > 120


def test_conversion_picks_ref_sparse_for_a_few_changed_entries_and_loads_bit_exact(tmp_path: Path) -> None:
    """A few scattered entries changed (first and last elements among them): stored as ``ref-sparse``, where the
    ordinal-delta stream would cost more (its header and per-chunk state); loads bit-exact."""
    from transformers import AutoModelForCausalLM

    from tpde_hf.conversion import convert

    base = _tiny("llama", tmp_path)
    base.save_pretrained(tmp_path / "base")
    tuned = _tiny("llama", tmp_path)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        emb = tuned.model.embed_tokens.weight.view(-1)
        at = torch.tensor([0, 4242, 20000])
        emb[at] = (emb[at].float() + torch.randn(3, generator=g) * 1e-2).to(emb.dtype)
        w = tuned.model.layers[1].mlp.down_proj.weight
        w.view(-1)[-1] = w.view(-1)[-1] * 1.5  # the last element of a linear weight
    tuned.save_pretrained(tmp_path / "ft")
    report = convert(tmp_path / "ft", tmp_path / "out", reference=tmp_path / "base", workers=1)
    per = report.reference["tensors"]
    assert per["model.embed_tokens.weight"]["stored_as"] == "ref-sparse"
    assert per["model.layers.1.mlp.down_proj.weight"]["stored_as"] == "ref-sparse"
    sd = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    for k, v in load_file(tmp_path / "ft" / "model.safetensors").items():
        assert bits_equal(sd[k], v), k
