"""The delta-repo load's prefetch: numpy blobs read from the memory map, references read unchecked and checked
only when a decode fails (naming a wrong reference), and the prefetch closed once the load is done."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tpde_hf
from tpde_hf.errors import TpdeFormatError

sys.path.insert(0, str(Path(__file__).parent))
from test_reference import bits_equal, make_pair, pair  # noqa: E402
from tpde_repo_helpers import modified_reference  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _convert(tmp_path: Path) -> tuple[Path, Path, Path]:
    from tpde_hf.reference.convert import convert_with_reference

    base, ft, _ = make_pair("llama", tmp_path)
    convert_with_reference(ft, tmp_path / "out", base, workers=1)
    return base, ft, tmp_path / "out"


def _ref_ord_reference_names(out: Path) -> list[str]:
    """Reference tensor names that the repo's ``ref-ord`` blobs are coded against."""
    import numpy as np

    import tpde_hf.reference.codec as C

    tensors = json.loads((out / "config.json").read_text())["quantization_config"]["reference"]["tensors"]
    names = []
    for k, v in load_file(out / "model.safetensors").items():
        if k.endswith(".ref-ord.blob"):
            h, _, _ = C.read_header(v, "ref-ord", k)
            names.append(tensors[int(np.int64(h[3]))][0])
    return names


def test_load_is_bit_exact_and_closes_its_prefetch(tmp_path: Path, monkeypatch) -> None:
    from transformers import AutoModelForCausalLM

    from tpde_hf.reference import load as L
    from tpde_hf.reference import prefetch as P
    from tpde_hf.reference import resolve as R

    _, ft, out = _convert(tmp_path)
    assert _ref_ord_reference_names(out)  # the batch path runs
    closed, unchecked, quantizers = [], [], []
    orig_close, orig_unchecked, orig_load = P.Prefetch.close, R.LoadReference.unchecked, L.close_reference_load
    monkeypatch.setattr(L, "close_reference_load", lambda q: (quantizers.append(q), orig_load(q))[1])
    monkeypatch.setattr(P.Prefetch, "close", lambda self: (closed.append(self), orig_close(self))[1])
    monkeypatch.setattr(R.LoadReference, "unchecked",
                        lambda self, i, k: (unchecked.append(k), orig_unchecked(self, i, k))[1])
    dense = AutoModelForCausalLM.from_pretrained(ft)
    model = AutoModelForCausalLM.from_pretrained(out, quantization_config=tpde_hf.TpdeConfig(mode="dequantize"))
    sd = model.state_dict()
    for k, v in dense.state_dict().items():
        assert bits_equal(sd[k], v), k
    assert unchecked, "the prefetch did not decode the ref-ord tensors"
    assert len(closed) == 1 and len(quantizers) == 1
    assert quantizers[0]._tpde_prefetch is None and quantizers[0]._tpde_reference is None
    assert closed[0]._batch is None and not closed[0]._where
    assert closed[0].take(torch.zeros(8, dtype=torch.int64).numpy()) is None  # a closed prefetch hands out nothing


def _flip(index: int, bit: int):
    def mutate(t: torch.Tensor) -> None:
        iv = {2: torch.int16, 4: torch.int32}[t.element_size()]
        t.view(iv).view(-1)[index] ^= 1 << bit
    return mutate


@pytest.mark.parametrize("case", ["first", "last", *range(10)])
def test_modified_reference_of_a_ref_ord_tensor_is_named(tmp_path: Path, case: str | int) -> None:
    """The prefetch reads references unchecked: a changed one must still be an error naming the reference.

    ``first``/``last``: one bit of the middle weight of the first/last reference tensor a ``ref-ord`` tensor is
    coded against; an int: a seeded flip of one random bit of one random weight of a random such tensor."""
    from transformers import AutoModelForCausalLM

    base, _, out = _convert(tmp_path)
    names = _ref_ord_reference_names(out)
    if isinstance(case, int):
        g = torch.Generator().manual_seed(case)
        name = names[int(torch.randint(len(names), (1,), generator=g))]
        numel, width = _numel_and_bits(base, name)
        mutate = _flip(int(torch.randint(numel, (1,), generator=g)), int(torch.randint(width, (1,), generator=g)))
    else:
        name = names[0] if case == "first" else names[-1]
        mutate = _flip(_numel_and_bits(base, name)[0] // 2, 0)
    bad = modified_reference(out, base, tmp_path / "base-modified", name, mutate)
    with pytest.raises(TpdeFormatError, match="wrong or modified reference") as exc:
        AutoModelForCausalLM.from_pretrained(out)
    assert str(bad) in str(exc.value)


def _numel_and_bits(base: Path, name: str) -> tuple[int, int]:
    t = load_file(base / "model.safetensors")[name]
    return t.numel(), 8 * t.element_size()


def test_last_batch_is_split_and_still_bit_exact(monkeypatch) -> None:
    """A closed job list's last batch is claimed in halves (threads finish together); every unit still decodes
    exactly once, bit-exact, with every dtype and the special values."""
    import threading

    import tpde_hf.reference.batch as B
    import tpde_hf.reference.codec as C
    from tpde_hf.codec.registry import CodecContext

    monkeypatch.setattr(C, "CHUNK", 1 << 10)  # many small chunks: a batch of many units
    items = []
    for i, (dtype, shape) in enumerate([(torch.bfloat16, (70_001,)), (torch.float16, (33, 650)),
                                        (torch.float32, (20_003,))]):
        base, tuned = pair(dtype, shape, seed=40 + i)
        items.append((C.RefOrd().encode(tuned, CodecContext("w", base, {"force": True}))["blob"], base, tuned))
    claims = []
    orig = B.call
    monkeypatch.setattr(B, "call", lambda f, lo, hi, *a: (claims.append(hi - lo), orig(f, lo, hi, *a))[1])
    batch = B.BatchDecode(batch_weights=1 << 30)  # one batch for everything
    idx = batch.add([C.prepare_ord(b, r, f"w{i}") for i, (b, r, _) in enumerate(items)])
    batch.close()
    n_units = sum(int(batch._segments[0].left[k]) for k in range(len(items)))
    threads = [threading.Thread(target=batch.work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sum(claims) == n_units and len(claims) > 3 and max(claims) <= (n_units + 1) // 2
    assert min(claims) >= B.TAIL_UNITS or len(claims) == 1
    for i, (_, _, tuned) in zip(idx, items, strict=True):
        assert bits_equal(batch.result(i), tuned)
