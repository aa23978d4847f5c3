"""Integrity by default: a damaged tpde repo raises, naming the tensor and the file, or loads bit-exact.

The repo is a small bf16 Llama converted by the real converter into two shards. The corruption
sweeps flip one seeded random bit at a time (every kind of stored tensor, the safetensors headers,
``config.json``'s ``quantization_config``) and load with default settings; a load must raise a clear
error or give weights bit-identical to the original. Zero silently wrong results.

Also: old repos (no checksums) load with one notice, ``tpde verify --write-checksums`` adds the
checksums, the opt-out skips the check, ``mode='base'`` never reads the delta, and a re-saved model
carries checksums.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import tpde_hf
from tpde_hf import integrity
from tpde_hf.conversion import convert, verify_repo
from tpde_hf.conversion.cli import main as cli_main
from tpde_hf.errors import TpdeFormatError
from tpde_hf.integrity import ALGO, META_ALGO, META_CHECKSUMS, read_shard_header

IDS = torch.tensor([[1, 5, 9, 77, 300, 411, 2]])
PARTS = ("qweight", "scales", "zeros", "delta", "lanes", "tables", "meta")
KINDS = (*PARTS, "norm", "embedding", "header")  # the categories of the sweep


# ==================================================================== fixtures and helpers
@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted tiny bf16 Llama in two shards (untied lm_head kept dense)."""
    from conftest import make_tiny_llama

    root = tmp_path_factory.mktemp("integrity")
    src = make_tiny_llama(root / "src")
    out = root / "tpde"
    convert(src, out, workers=1, max_shard_size="400KB")
    assert len(integrity.repo_weight_files(out)) == 2
    return out


@pytest.fixture(scope="module")
def original(repo: Path) -> dict[str, torch.Tensor]:
    """The source model's tensors, as saved by transformers."""
    return _tensors(repo.parent / "src")


@pytest.fixture(scope="module")
def stored(repo: Path) -> dict[str, torch.Tensor]:
    """The converted repo's stored tensors (what a lossless load must hold)."""
    return _tensors(repo)


@pytest.fixture(scope="module")
def clean_logits(repo: Path) -> dict[str, torch.Tensor]:
    return {mode: _load(repo, mode)(IDS).logits.detach() for mode in ("dequantize", "lossless")}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _load(folder: Path, mode: str | None = None, **cfg):
    kwargs = {"quantization_config": tpde_hf.TpdeConfig(mode=mode, **cfg)} if mode or cfg else {}
    return AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()


def _bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _copy(repo: Path, dst: Path) -> Path:
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(repo, dst)
    return dst


def _flip(path: Path, offset: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))


def _kind(name: str) -> str:
    suffix = name.rpartition(".")[2]
    if suffix in PARTS:
        return suffix
    return "norm" if "norm" in name else "embedding"  # embed_tokens, lm_head


def _flips(repo: Path, n: int, seed: int) -> list[tuple[str, str, str, int, int]]:
    """``n`` seeded flips ``(kind, shard name, tensor or 'header', offset, bit)``, every kind in turn."""
    rng = random.Random(seed)
    heads = [read_shard_header(f) for f in integrity.repo_weight_files(repo)]
    by_kind: dict[str, list] = {k: [] for k in KINDS}
    for h in heads:
        for t in h.tensors.values():
            if t.end > t.begin:
                by_kind[_kind(t.name)].append((h, t))
    flips = []
    for i in range(n):
        kind = KINDS[i % len(KINDS)]
        if kind == "header":
            h = rng.choice(heads)
            flips.append((kind, Path(h.path).name, "header", rng.randrange(h.data_start), rng.randrange(8)))
        else:
            h, t = rng.choice(by_kind[kind])
            flips.append((kind, Path(h.path).name, t.name, rng.randrange(t.begin, t.end), rng.randrange(8)))
    return flips


def _outcome(folder: Path, mode: str, shard: str, tensor: str, original, stored, clean_logits) -> str:
    """Load with default settings (``mode`` only); 'raised' (a clear error) or 'same' (bit-identical), else fail."""
    try:
        model = _load(folder, None if mode == "dequantize" else mode)  # dequantize: the CPU default
    except TpdeFormatError as exc:
        msg = str(exc)
        assert shard in msg, f"the error does not name the file: {msg}"
        assert tensor == "header" or tensor in msg, f"the error does not name the tensor: {msg}"
        return "raised"
    sd = model.state_dict()
    reference = original if mode == "dequantize" else stored
    wrong = [k for k, v in reference.items() if k not in sd or not _same(sd[k], v)]
    assert not wrong, f"SILENTLY WRONG: {shard} {tensor}: {wrong[:5]}"
    assert _same(model(IDS).logits.detach(), clean_logits[mode]), f"SILENTLY WRONG logits: {shard} {tensor}"
    return "same"


def _sweep(repo: Path, tmp_path: Path, mode: str, n: int, seed: int, original, stored, clean_logits) -> dict:
    outcomes: dict[str, dict[str, int]] = {}
    for i, (kind, shard, tensor, offset, bit) in enumerate(_flips(repo, n, seed)):
        folder = _copy(repo, tmp_path / "flip")
        _flip(folder / shard, offset, bit)
        result = _outcome(folder, mode, shard, tensor, original, stored, clean_logits)
        if kind != "header":  # every changed stored byte is caught by its checksum
            assert result == "raised", f"flip {i}: {kind} {tensor} byte {offset} bit {bit} loaded"
        outcomes.setdefault(kind, {}).setdefault(result, 0)
        outcomes[kind][result] += 1
    return outcomes


def _strip_checksums(folder: Path) -> None:
    """Make ``folder`` look like a repo written before checksums: plain shards, no config field."""
    for f in integrity.repo_weight_files(folder):
        save_file(load_file(f), f, metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["quantization_config"]["integrity"]
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def _dense_offset(folder: Path, name: str = "model.norm.weight") -> tuple[Path, int]:
    for f in integrity.repo_weight_files(folder):
        t = read_shard_header(f).tensors.get(name)
        if t is not None:
            return f, t.begin + 3
    raise AssertionError(name)


# ==================================================================== what the converter writes
def test_every_stored_tensor_has_a_checksum_of_its_dtype_shape_and_bytes(repo: Path) -> None:
    config = json.loads((repo / "config.json").read_text())
    assert config["quantization_config"]["integrity"] == ALGO
    kinds = set()
    for f in integrity.repo_weight_files(repo):
        head = read_shard_header(f)
        sums = head.checksums()
        assert head.metadata[META_ALGO] == ALGO and set(sums) == set(head.tensors)
        assert head.metadata["format"] == "pt"
        for t in head.tensors.values():
            kinds.add(_kind(t.name))
            data = f.read_bytes()[t.begin : t.end]
            assert sums[t.name] == integrity.digest_of(t.dtype, t.shape, [data])
            assert sums[t.name] != integrity.digest_of(t.dtype, (*t.shape, 1), [data])  # the shape is hashed too
    assert kinds == set(KINDS) - {"header"}


# ==================================================================== the corruption sweeps
@pytest.mark.parametrize("mode", ["dequantize", "lossless"])
def test_corruption_sweep_is_never_silent(repo, original, stored, clean_logits, tmp_path, mode) -> None:
    outcomes = _sweep(repo, tmp_path, mode, 4 * len(KINDS), seed=17 if mode == "lossless" else 11,
                      original=original, stored=stored, clean_logits=clean_logits)
    assert set(outcomes) == set(KINDS)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dequantize", "lossless"])
def test_corruption_sweep_large(repo, original, stored, clean_logits, tmp_path, mode) -> None:
    outcomes = _sweep(repo, tmp_path, mode, 40 * len(KINDS), seed=1017 if mode == "lossless" else 1011,
                      original=original, stored=stored, clean_logits=clean_logits)
    assert set(outcomes) == set(KINDS)


def _config_flips(repo: Path, n: int, seed: int) -> list[tuple[int, int]]:
    raw = (repo / "config.json").read_bytes()
    start = raw.index(b'"quantization_config"')
    end = raw.index(b"}", start) + 1
    rng = random.Random(seed)
    return [(rng.randrange(start, end), rng.randrange(8)) for _ in range(n)]


def _config_sweep(repo, tmp_path, original, n: int, seed: int) -> dict[str, int]:
    """Flip bits of the quantization_config object; a default load raises naming the config, or is bit-exact."""
    raw = (repo / "config.json").read_bytes()
    counts: dict[str, int] = {}
    for offset, bit in _config_flips(repo, n, seed):
        folder = _copy(repo, tmp_path / "cfg")
        damaged = bytearray(raw)
        damaged[offset] ^= 1 << bit
        (folder / "config.json").write_bytes(bytes(damaged))
        where = bytes(damaged[max(0, offset - 20) : offset + 10])
        try:
            model = _load(folder)
        except (TpdeFormatError, OSError, ValueError) as exc:
            msg = str(exc)
            assert isinstance(exc, TpdeFormatError) or "config" in msg.lower(), f"{where!r}: unclear error {msg}"
            counts[type(exc).__name__] = counts.get(type(exc).__name__, 0) + 1
            continue
        sd = model.state_dict()
        wrong = [k for k, v in original.items() if k not in sd or not _same(sd[k], v)]
        assert not wrong, f"SILENTLY WRONG after a config flip at {where!r}: {wrong[:3]}"
        counts["same"] = counts.get("same", 0) + 1
    return counts


def test_config_flip_sweep_is_never_silent(repo, original, tmp_path) -> None:
    counts = _config_sweep(repo, tmp_path, original, 30, seed=5)
    assert counts.get("same") and counts.get("TpdeFormatError")


@pytest.mark.slow
def test_config_flip_sweep_large(repo, original, tmp_path) -> None:
    _config_sweep(repo, tmp_path, original, 600, seed=6)


@pytest.mark.parametrize("edit", ["key", "quant_method"])
def test_config_that_no_longer_names_tpde_raises_instead_of_random_weights(repo, tmp_path, edit) -> None:
    folder = _copy(repo, tmp_path / "r")
    raw = (folder / "config.json").read_text()
    raw = raw.replace('"quantization_config"', '"quantizatioo_config"') if edit == "key" else raw.replace(
        '"quant_method": "tpde"', '"quant_method": "tpdd"')
    (folder / "config.json").write_text(raw)
    with pytest.raises(TpdeFormatError, match=r"config\.json.*tpde form.*quant_method 'tpde'"):
        _load(folder)


# ==================================================================== damaged metadata
def test_a_shard_without_checksums_in_a_repo_that_promises_them_is_an_error(repo, tmp_path) -> None:
    folder = _copy(repo, tmp_path / "r")
    shard = integrity.repo_weight_files(folder)[1]
    save_file(load_file(shard), shard, metadata={"format": "pt"})
    with pytest.raises(TpdeFormatError, match=rf"{shard.name}.*no tpde checksums|{shard.name}.*has none"):
        _load(folder)


def test_checksums_in_the_shards_are_checked_even_if_the_config_lost_its_field(repo, tmp_path) -> None:
    folder = _copy(repo, tmp_path / "r")
    cfg = json.loads((folder / "config.json").read_text())
    del cfg["quantization_config"]["integrity"]
    (folder / "config.json").write_text(json.dumps(cfg))
    shard, offset = _dense_offset(folder)
    _flip(shard, offset, 2)
    with pytest.raises(TpdeFormatError, match=rf"model\.norm\.weight.*{shard.name}.*damaged"):
        _load(folder)


def test_damaged_checksum_metadata_names_the_file(repo, tmp_path) -> None:
    folder = _copy(repo, tmp_path / "r")
    shard = integrity.repo_weight_files(folder)[0]
    raw = bytearray(shard.read_bytes())
    at = raw.index(META_CHECKSUMS.encode()) + len(META_CHECKSUMS) + 5  # inside the JSON string of digests
    raw[at] = ord("!")
    shard.write_bytes(bytes(raw))
    with pytest.raises(TpdeFormatError, match=shard.name):
        _load(folder)


# ==================================================================== old repos, opt-out, base mode
def test_old_repo_loads_with_one_notice_and_write_checksums_adds_them(repo, original, tmp_path, caplog) -> None:
    folder = _copy(repo, tmp_path / "old")
    _strip_checksums(folder)
    with caplog.at_level(logging.WARNING, logger="tpde_hf.integrity"):
        for _ in range(2):
            sd = _load(folder).state_dict()
            assert all(_same(sd[k], v) for k, v in original.items())
    notices = [r for r in caplog.records if r.name == "tpde_hf.integrity"]
    assert len(notices) == 1 and "\n" not in notices[0].getMessage()
    assert f"tpde verify --write-checksums {folder}" in notices[0].getMessage()

    assert cli_main(["verify", "--write-checksums", str(folder)]) == 0
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["integrity"] == ALGO
    assert all(read_shard_header(f).checksums() for f in integrity.repo_weight_files(folder))
    clean = _tensors(repo)
    assert all(_same(a, clean[k]) for k, a in _tensors(folder).items())  # the data bytes are unchanged
    assert verify_repo(folder).checksums == ALGO
    caplog.clear()
    shard, offset = _dense_offset(folder)
    _flip(shard, offset, 0)
    with pytest.raises(TpdeFormatError, match=rf"model\.norm\.weight.*{shard.name}"):
        _load(folder)


def test_write_checksums_refuses_a_repo_that_fails_verification(repo, tmp_path, capsys) -> None:
    folder = _copy(repo, tmp_path / "old")
    _strip_checksums(folder)
    shard, offset = _dense_offset(folder)
    _flip(shard, offset, 1)
    before = shard.read_bytes()
    assert cli_main(["verify", "--write-checksums", str(folder)]) == 1
    assert "model.norm.weight" in capsys.readouterr().out
    assert shard.read_bytes() == before and "integrity" not in (folder / "config.json").read_text()
    assert not list(folder.glob("*.tmp"))


def test_verify_reports_damaged_checksums_and_write_checksums_repairs_them(repo, tmp_path) -> None:
    folder = _copy(repo, tmp_path / "r")
    shard = integrity.repo_weight_files(folder)[0]
    head = read_shard_header(shard)
    name = sorted(head.checksums())[0]
    raw = shard.read_bytes()
    digest = head.checksums()[name].encode()
    fixed = "0" * 16 if digest != b"0" * 16 else "1" * 16
    shard.write_bytes(raw.replace(digest, fixed.encode(), 1))  # the bytes are intact, the checksum is not
    report = verify_repo(folder, raise_on_error=False)
    assert not report.ok and any(name in f and ALGO in f for f in report.failures)
    with pytest.raises(TpdeFormatError, match=name):
        _load(folder)
    assert cli_main(["verify", "--write-checksums", str(folder)]) == 0
    assert verify_repo(folder).ok
    _load(folder)


def test_opt_out_skips_the_check(repo, original, tmp_path) -> None:
    folder = _copy(repo, tmp_path / "r")
    shard, offset = _dense_offset(folder)
    _flip(shard, offset, 6)
    with pytest.raises(TpdeFormatError, match="model.norm.weight"):
        _load(folder)
    model = _load(folder, check_integrity=False)  # the check is skipped: the damaged norm loads
    assert not _same(model.state_dict()["model.norm.weight"], original["model.norm.weight"])
    assert tpde_hf.TpdeConfig(check_integrity=False).get_loading_attributes() == {"check_integrity": False}


def test_base_mode_never_reads_the_delta(repo, tmp_path, monkeypatch) -> None:
    read: list[str] = []
    real = integrity.hash_stored

    def spy(head, names):
        names = list(names)
        read.extend(names)
        return real(head, names)

    monkeypatch.setattr(integrity, "hash_stored", spy)
    _load(repo, "base")
    assert read and not [n for n in read if n.rpartition(".")[2] in ("delta", "lanes", "tables")]
    assert any(n.endswith(".qweight") for n in read) and "model.norm.weight" in read
    read.clear()
    _load(repo, "lossless")
    assert any(n.endswith(".delta") for n in read)
    # a damaged delta: base mode (which never reads it) loads, lossless refuses
    folder = _copy(repo, tmp_path / "r")
    for f in integrity.repo_weight_files(folder):
        t = read_shard_header(f).tensors.get("model.layers.0.mlp.up_proj.delta")
        if t is not None:
            _flip(f, t.begin + 10, 3)
    _load(folder, "base")
    with pytest.raises(TpdeFormatError, match=r"up_proj\.delta"):
        _load(folder, "lossless")


# ==================================================================== re-saved models
def test_save_pretrained_of_a_loaded_model_writes_checksums(repo, stored, tmp_path) -> None:
    model = _load(repo, "lossless")
    out = tmp_path / "saved"
    model.save_pretrained(out)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["integrity"] == ALGO
    for f in integrity.repo_weight_files(out):
        head = read_shard_header(f)
        assert set(head.checksums()) == set(head.tensors)
    assert verify_repo(out).ok  # the manifest still matches
    sd = _load(out, "lossless").state_dict()
    assert all(_same(sd[k], v) for k, v in stored.items())
    shard, offset = _dense_offset(out)
    _flip(shard, offset, 4)
    with pytest.raises(TpdeFormatError, match="model.norm.weight"):
        _load(out, "lossless")
    # transformers' own save (what push_to_hub uploads before tpde can add checksums) promises none
    plain = tmp_path / "plain"
    type(model).save_pretrained(model, plain)
    assert "integrity" not in json.loads((plain / "config.json").read_text())["quantization_config"]
    sd = _load(plain, "lossless").state_dict()  # an unchecked repo (one notice), not an error
    assert all(_same(sd[k], v) for k, v in stored.items())


# ==================================================================== the helpers themselves
def test_add_checksums_keeps_the_data_and_other_metadata(tmp_path) -> None:
    path = tmp_path / "x.safetensors"
    tensors = {"b": torch.arange(10, dtype=torch.int16), "a": torch.randn(3, 5).to(torch.bfloat16),
               "e": torch.zeros(0, 2)}
    save_file(tensors, path, metadata={"format": "pt", "k": "v"})
    before = read_shard_header(path)
    data = path.read_bytes()[before.data_start :]
    integrity.add_checksums(path)
    after = read_shard_header(path)
    assert path.read_bytes()[after.data_start :] == data and after.data_start % 8 == 0
    assert after.metadata["k"] == "v" and set(after.checksums()) == set(tensors)
    back = load_file(path)
    assert all(_same(back[k], v) for k, v in tensors.items())
    integrity.check_checkpoint([path], integrity=ALGO)
    assert not list(tmp_path.glob("*.tmp"))


def test_a_failed_rewrite_leaves_the_shard_intact(tmp_path, monkeypatch) -> None:
    path = tmp_path / "x.safetensors"
    save_file({"a": torch.ones(4)}, path)
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(integrity.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        integrity.add_checksums(path)
    assert path.read_bytes() == before and not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize("first", ["tpde_hf", "transformers.modeling_utils"])
def test_the_config_guard_is_in_place_whatever_the_import_order(first) -> None:
    import subprocess
    import sys

    other = "transformers.modeling_utils" if first == "tpde_hf" else "tpde_hf"
    code = (f"import {first}, {other}; import transformers.modeling_utils as mu; "
            "print(getattr(mu.log_state_dict_report, '_tpde_plain_load_guard', False))")
    root = Path(tpde_hf.__file__).parents[1]
    env = {"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "TPDE_HF_NO_AUTOREGISTER": "1"}  # no .pth hook
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr


def test_a_cache_snapshot_without_checksums_gets_advice_that_works_there(repo, tmp_path, caplog) -> None:
    """Hub cache snapshots link to blobs: --write-checksums refuses them, so the notice says to download first."""
    from tpde_hf.conversion import ConversionError
    from tpde_hf.conversion.verify import write_checksums

    old = _copy(repo, tmp_path / "old")
    _strip_checksums(old)
    snap = tmp_path / "snapshot"
    snap.mkdir()
    for f in old.iterdir():
        (snap / f.name).symlink_to(f)
    with caplog.at_level(logging.WARNING, logger="tpde_hf.integrity"):
        _load(snap)
    assert "hf download" in caplog.text and "--write-checksums DIR" in caplog.text
    with pytest.raises(ConversionError, match="symlink"):
        write_checksums(snap)
    with pytest.raises(ConversionError, match="local folder"):
        write_checksums(tmp_path / "no-such-folder")


def test_the_benchmark_section_renders(tmp_path) -> None:
    from benchmarks.report import render_report

    runs = {"on_s": [2.1, 2.0], "off_s": [2.0, 1.9], "check_in_load_s": [0.03, 0.02], "check_alone_s": 0.02,
            "hashed_bytes": 2 * 10**8, "hashed_tensors": 10}
    from benchmarks.bench_integrity import summarize

    modes = summarize({"dequantize": runs, "lossless": {**runs, "on_s": [0.6, 0.5], "off_s": [0.5, 0.5]}})
    assert modes["dequantize"]["overhead_pct_of_cpu_default_load"] == pytest.approx(100 * 0.1 / 1.95, abs=0.01)
    results = tmp_path / "results"
    results.mkdir()
    data = {"benchmark": "integrity", "date": "2026-12-06T10:00:00+00:00", "goal": "at most 10%",
            "models": {"smollm2": {"repo_mb": 214.0, "note": "4-bit grid", "modes": modes}}}
    (results / "integrity.json").write_text(json.dumps(data))
    text = render_report(results, tmp_path / "BENCHMARKS.md").markdown
    assert "## integrity" in text
    assert "| smollm2 | dequantize | 214 | 2.05 | 1.95 | 0.100 | 5.1% | 5.1% | 0.0250 | 1.3% |" in text
