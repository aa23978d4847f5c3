"""Fine-tunes stored as exact deltas against a reference model (tpde_hf.reference): codecs, conversion, loading,
verification, errors, and the Hub (cache, pinned commit, offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tpde_repo_helpers import modified_reference

import tpde_hf
import tpde_hf.reference  # noqa: F401  (registers the codecs lazily)
from tpde_hf.codec.registry import TENSOR_CODECS, CodecContext, group_coded_keys
from tpde_hf.errors import TpdeFormatError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
INT = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype in INT:
        return torch.equal(a.view(INT[a.dtype]), b.view(INT[b.dtype]))
    return torch.equal(a, b)


def pair(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0, frac: float = 0.3) -> tuple[torch.Tensor, ...]:
    """(base, fine-tune): small changes on ``frac`` of the entries, plus ±0, subnormals, inf, NaN and random bit
    patterns (NaN payloads included) on either side."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g) * 0.02
    tuned = base + torch.randn(shape, generator=g) * 1e-3 * (torch.rand(shape, generator=g) < frac)
    base, tuned = base.to(dtype).contiguous(), tuned.to(dtype).contiguous()
    fb, ft = base.view(-1), tuned.view(-1)
    tiny = torch.finfo(dtype).tiny
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), tiny / 4, -tiny / 2,
                             torch.finfo(dtype).max], dtype=dtype)
    k = min(specials.numel(), fb.numel() // 4)
    if k:
        ft[:k] = specials[:k]
        fb[k : 2 * k] = specials[:k]
        fb[2 * k : 3 * k] = specials[:k]
        ft[2 * k : 3 * k] = specials[:k].flip(0)
        m = min(16, fb.numel() - 3 * k)
        w = 16 if dtype != torch.float32 else 32
        rnd = torch.randint(-(2 ** (w - 1)), 2 ** (w - 1), (m,), generator=g, dtype=torch.int64).to(INT[dtype])
        ft[3 * k : 3 * k + m] = rnd.view(dtype)
    return base, tuned


# ==================================================================== codecs
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(1,), (7,), (33, 65), (3, 5, 7), (70_001,)])
def test_ref_ord_round_trip_is_bit_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    base, tuned = pair(dtype, shape, seed=len(shape) + shape[0])
    codec = TENSOR_CODECS.get("ref-ord")
    parts = codec.encode(tuned, CodecContext("w", base, {"force": True}))
    out = codec.decode(parts, CodecContext("w", base))
    assert bits_equal(out, tuned)
    paying = codec.encode(tuned, CodecContext("w", base))  # None where it would not be smaller than the tensor
    assert (paying is not None) == (parts["blob"].numel() < tuned.numel() * tuned.element_size())
    if tuned.numel() > 10_000:
        assert paying is not None


def test_ref_ord_context_from_a_reference_in_another_dtype() -> None:
    base32, tuned32 = pair(torch.float32, (64, 96), seed=3)
    tuned = tuned32.to(torch.bfloat16)
    codec = TENSOR_CODECS.get("ref-ord")
    parts = codec.encode(tuned, CodecContext("w", base32))
    assert bits_equal(codec.decode(parts, CodecContext("w", base32)), tuned)


def test_ref_same_only_for_identical_bits() -> None:
    base, tuned = pair(torch.bfloat16, (40, 40), seed=5)
    same = TENSOR_CODECS.get("ref-same")
    parts = same.encode(base.clone(), CodecContext("w", base))
    assert parts is not None and parts["blob"].numel() <= 256
    assert bits_equal(same.decode(parts, CodecContext("w", base)), base)
    assert same.encode(tuned, CodecContext("w", base)) is None
    # -0.0 vs +0.0 and two NaN payloads compare equal as floats, but not as bits
    z = torch.zeros(8, dtype=torch.bfloat16)
    assert same.encode(-z, CodecContext("w", z)) is None
    ids = torch.arange(10)
    assert bits_equal(same.decode(same.encode(ids.clone(), CodecContext("ids", ids)), CodecContext("ids", ids)), ids)


def test_decode_against_a_different_reference_is_an_error_not_a_wrong_tensor() -> None:
    base, tuned = pair(torch.bfloat16, (50, 50), seed=7)
    other = base.clone()
    other.view(-1)[123] = other.view(-1)[123] * 2 + 0.5
    for name in ("ref-ord", "ref-same"):
        codec = TENSOR_CODECS.get(name)
        src = tuned if name == "ref-ord" else base
        parts = codec.encode(src, CodecContext("w", base))
        with pytest.raises(TpdeFormatError, match="checksum"):
            codec.decode(parts, CodecContext("w", other))
        with pytest.raises(TpdeFormatError, match="shape"):
            codec.decode(parts, CodecContext("w", base[:10]))



def sweep_blob(codec, blob: torch.Tensor, base: torch.Tensor, expected: torch.Tensor, seed: int, n: int) -> dict:
    """Decode ``n`` seeded corruptions of ``blob`` (a flipped bit, or every 4th a truncation at a random point):
    each must give ``expected`` bit for bit or raise a TpdeFormatError naming the tensor. Returns the counts."""
    g = torch.Generator().manual_seed(seed)
    outcomes = {"exact": 0, "error": 0}
    for i in range(n):
        b = blob.clone()
        if i % 4 == 3:
            b = b[: int(torch.randint(0, b.numel(), (1,), generator=g))]
        else:
            pos = int(torch.randint(0, b.numel(), (1,), generator=g))
            b[pos] ^= 1 << int(torch.randint(0, 8, (1,), generator=g))
        try:
            out = codec.decode({"blob": b}, CodecContext("layer.w", base))
        except TpdeFormatError as exc:
            assert "layer.w" in str(exc)
            outcomes["error"] += 1
            continue
        assert bits_equal(out, expected)
        outcomes["exact"] += 1
    return outcomes


def test_corruption_sweep_over_the_blob() -> None:
    """Flipped bits and truncations at seeded random places: exact, or a TpdeFormatError naming the tensor."""
    base, tuned = pair(torch.bfloat16, (70_000,), seed=11, frac=0.5)
    codec = TENSOR_CODECS.get("ref-ord")
    blob = codec.encode(tuned, CodecContext("layer.w", base))["blob"]
    outcomes = sweep_blob(codec, blob, base, tuned, seed=1234, n=120)
    assert outcomes["error"] > 100


# ==================================================================== conversion and loading
def _tiny(kind: str, path: Path, seed: int = 0) -> torch.nn.Module:
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "llama":
        m = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    elif kind == "bert":
        m = BertModel(BertConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                 num_attention_heads=4, max_position_embeddings=64))
    elif kind == "mixtral":  # per-expert checkpoint weights that transformers fuses at load
        from transformers import MixtralConfig, MixtralForCausalLM

        m = MixtralForCausalLM(MixtralConfig(vocab_size=256, hidden_size=128, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                             num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64))
    else:
        m = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=128, n_layer=2, n_head=4, n_positions=64))
    return m.to(torch.bfloat16).eval()


def make_pair(kind: str, root: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """A base folder and a fine-tune folder: layer 0 and the embeddings changed a little, the rest identical."""
    base = _tiny(kind, root)
    base.save_pretrained(root / "base")
    tuned = _tiny(kind, root)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in tuned.named_parameters():
            if (".0." in n or "embed" in n or "wte" in n) and p.is_floating_point():
                noise = torch.randn(p.shape, generator=g) * 2e-3 * (torch.rand(p.shape, generator=g) < 0.2)
                p.copy_((p.float() + noise).to(p.dtype))
    tuned.save_pretrained(root / "ft")
    return root / "base", root / "ft", load_file(root / "ft" / "model.safetensors")


def auto_class(kind: str):
    from transformers import AutoModel, AutoModelForCausalLM

    return AutoModel if kind == "bert" else AutoModelForCausalLM


@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2", pytest.param("mixtral", marks=pytest.mark.slow)])
def test_convert_and_load_bit_exact_in_every_mode(kind: str, tmp_path: Path) -> None:
    from tpde_hf.reference.convert import convert_with_reference

    base, ft, tensors = make_pair(kind, tmp_path)
    summary = convert_with_reference(ft, tmp_path / "out", base, workers=1)
    kinds = summary["reference"]["stored_as"]
    experts = {k: v["stored_as"] for k, v in summary["tensors"].items() if ".experts." in k}
    assert all(not v.startswith("ref-") for v in experts.values())  # the model fuses them: kept standalone
    assert kinds.get("ref-same", 0) > 0 and kinds.get("ref-ord", 0) > 0
    assert summary["reference"]["stored_bytes"] < summary["reference"]["source_bytes"] / (1.5 if experts else 3)
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert qc["reference"]["model"] == str(base.resolve()) and qc["reference"]["commit"] is None
    assert len(qc["reference"]["tensors"]) == summary["reference"]["tensors_used"]
    cls = auto_class(kind)
    dense = cls.from_pretrained(ft)
    for mode in ("dequantize", "lossless"):
        model = cls.from_pretrained(tmp_path / "out", quantization_config=tpde_hf.TpdeConfig(mode=mode))
        if mode == "dequantize":
            sd = model.state_dict()
            for k, v in dense.state_dict().items():
                assert bits_equal(sd[k], v), (mode, k)
        x = torch.tensor([[3, 5, 7, 11]])
        with torch.no_grad():
            a = dense(input_ids=x)[0]
            b = model(input_ids=x)[0]
        assert bits_equal(a, b), mode
    # a loaded delta model saves as a plain (dense-weights) model that loads without the reference
    model = cls.from_pretrained(tmp_path / "out", quantization_config=tpde_hf.TpdeConfig(mode="dequantize"))
    model.save_pretrained(tmp_path / "resaved")
    assert not group_coded_keys(load_file(tmp_path / "resaved" / "model.safetensors"))


def test_cli_convert_verify_and_reference_errors(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tpde_hf.conversion.cli import main
    from tpde_hf.conversion.verify import verify_repo

    base, ft, _ = make_pair("llama", tmp_path)
    out = tmp_path / "out"
    assert main(["-q", "convert", str(ft), str(out), "--reference", str(base)]) == 0
    assert verify_repo(out).ok
    card = (out / "README.md").read_text()
    assert "delta against its base model" in card and "base_model:" not in card  # a local path is never published

    # modified reference: a tensor it was coded against changed -> clear error naming the reference, no model
    name = json.loads((out / "config.json").read_text())["quantization_config"]["reference"]["tensors"][0][0]
    bad = modified_reference(out, base, tmp_path / "base-modified", name, lambda t: t.view(-1)[0].add_(1))
    with pytest.raises(TpdeFormatError, match="wrong or modified reference") as exc:
        AutoModelForCausalLM.from_pretrained(out)
    assert str(bad) in str(exc.value)
    report = verify_repo(out, raise_on_error=False)
    assert not report.ok and any("wrong or modified reference" in f for f in report.failures)

    # missing reference
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["reference"]["model"] = str(tmp_path / "gone")
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(TpdeFormatError, match="reference model not found") as exc:
        AutoModelForCausalLM.from_pretrained(out)
    assert "gone" in str(exc.value)


def test_corrupt_stored_part_is_a_clear_error(tmp_path: Path) -> None:
    """A damaged delta in the shard: caught by the shard checksum (integrity) before any decode."""
    from transformers import AutoModelForCausalLM

    from tpde_hf.reference.convert import convert_with_reference

    base, ft, _ = make_pair("llama", tmp_path)
    out = tmp_path / "out"
    convert_with_reference(ft, out, base, workers=1)
    path = out / "model.safetensors"
    data = bytearray(path.read_bytes())
    from tpde_hf.integrity import read_shard_header

    head = read_shard_header(path)
    key = next(k for k in head.tensors if ".tpde_codec.ref-ord." in k)
    data[(head.tensors[key].begin + head.tensors[key].end) // 2] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(TpdeFormatError, match="damaged"):
        AutoModelForCausalLM.from_pretrained(out)
    # without the integrity check, the codec's own checks still refuse it
    with pytest.raises(TpdeFormatError, match=key.split(".tpde_codec")[0].split(".", 1)[1]):
        AutoModelForCausalLM.from_pretrained(out, quantization_config=tpde_hf.TpdeConfig(check_integrity=False))


# ==================================================================== the Hub: pinned commit, cache, offline, push
@pytest.mark.slow
def test_hub_reference_pinned_cached_offline_and_push(local_hub, tmp_path: Path) -> None:
    import subprocess
    import sys
    import textwrap

    from conftest import HUB_TOKEN, HUB_USER

    base, ft, _ = make_pair("llama", tmp_path)
    home = tmp_path / "hf_home"
    root = Path(__file__).resolve().parents[1]

    def client(code: str, offline: bool = False, hf_home: Path = home) -> subprocess.CompletedProcess:
        env = local_hub.client_env(token=HUB_TOKEN, hf_home=hf_home)
        env["PYTHONPATH"] = str(root)
        if offline:
            env["HF_HUB_OFFLINE"] = "1"
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                              timeout=300, check=False)

    setup = client(f"""
        import json
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo("{HUB_USER}/base")
        c = api.upload_folder(folder_path="{base}", repo_id="{HUB_USER}/base")
        from tpde_hf.reference.convert import convert_with_reference
        s = convert_with_reference("{ft}", "{tmp_path / 'out'}", "{HUB_USER}/base@main", workers=1)
        api.upload_folder(folder_path="{base}", repo_id="{HUB_USER}/base", commit_message="later commit",
                          allow_patterns=["config.json"])  # main moves on; the repo stays pinned to its commit
        import tpde_hf
        from tpde_hf.conversion.hub import push_to_hub
        push_to_hub("{tmp_path / 'out'}", "{HUB_USER}/ft-delta")
        print(json.dumps({{"commit": c.oid, "recorded": s["reference"]["commit"]}}))
    """)
    assert setup.returncode == 0, setup.stderr[-3000:]
    info = json.loads(setup.stdout.strip().splitlines()[-1])
    assert info["recorded"] == info["commit"]
    card = local_hub.file_content(f"{HUB_USER}/ft-delta", "README.md").decode()
    assert f"base_model: {HUB_USER}/base" in card and "base_model_relation: finetune" in card

    check = f"""
        import json, torch, tpde_hf
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained("{HUB_USER}/ft-delta")
        want = load_file("{ft / 'model.safetensors'}")
        sd = m.state_dict()
        ok = all(torch.equal(sd[k].view(torch.int16), v.view(torch.int16)) for k, v in want.items())
        print(json.dumps({{"ok": ok}}))
    """
    online = client(check)
    assert online.returncode == 0, online.stderr[-3000:]
    assert json.loads(online.stdout.strip().splitlines()[-1])["ok"]
    offline = client(check, offline=True)  # everything is in the cache now
    assert offline.returncode == 0, offline.stderr[-3000:]
    assert json.loads(offline.stdout.strip().splitlines()[-1])["ok"]
    snaps = list((home / "hub" / f"models--{HUB_USER}--base" / "snapshots").iterdir())
    assert [s.name for s in snaps] == [info["commit"]]  # the pinned commit, not the later main

    # offline with the delta repo but no cached reference: a clear error that names the reference
    fresh = tmp_path / "hf_home2"
    shutil.copytree(home, fresh)
    shutil.rmtree(fresh / "hub" / f"models--{HUB_USER}--base")
    missing = client(check, offline=True, hf_home=fresh)
    assert missing.returncode != 0
    assert f"{HUB_USER}/base@{info['commit']}" in missing.stderr and "offline" in missing.stderr


def test_reference_may_be_a_tpde_repo(tmp_path: Path) -> None:
    """The base on disk is itself a tpde repo: its weights are decoded (bit-exact) to code and rebuild against."""
    from transformers import AutoModelForCausalLM

    from tpde_hf.conversion import convert

    base, ft, tensors = make_pair("llama", tmp_path)
    convert(base, tmp_path / "base-tpde", workers=1)
    report = convert(ft, tmp_path / "out", reference=tmp_path / "base-tpde", workers=1)
    assert report.reference["reference"]["stored_as"].get("ref-ord", 0) > 0
    sd = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    for k, v in tensors.items():
        assert bits_equal(sd[k], v), k
