"""Conversion speed-ups that must not change a bit: encoding guessed weights while the architecture is
built, task threads in the main process, and the on-disk layout cache.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from test_conversion import assert_bit_exact_repo, source_tensors  # sibling test module

from tpde_hf.codec import CodecParams, encode_tensor, limit_codec_threads
from tpde_hf.codec.backend import thread_limit
from tpde_hf.conversion import api as conversion_api
from tpde_hf.conversion import convert, layout_cache, verify_repo
from tpde_hf.conversion import encoding as conversion_encoding
from tpde_hf.conversion.api import _read_headers
from tpde_hf.conversion.encoding import _TaskThreads
from tpde_hf.conversion.selection import config_vocab_sizes, likely_linear_weights, load_layout, select_tensors
from tpde_hf.conversion.streaming import read_header


def _weights_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


# ==================================================================== the guess
def test_guess_is_the_linear_weights_and_never_an_embedding_or_kept_head(tiny_llama_dir: Path) -> None:
    infos = _read_headers(sorted(tiny_llama_dir.glob("*.safetensors")))
    guess = {i.name for i in likely_linear_weights(infos, vocab_sizes=config_vocab_sizes(tiny_llama_dir))}
    exact = set(select_tensors(infos, load_layout(tiny_llama_dir)).encoded)
    assert guess == exact and len(exact) == 14  # on a plain Llama the guess is the selection itself
    assert not any("embed" in n or "norm" in n or "lm_head" in n for n in guess)

    names = {i.name for i in likely_linear_weights(infos, exclude=r"\.mlp\.")}
    assert names and not any(".mlp." in n for n in names)
    names = {i.name for i in likely_linear_weights(infos, include=r"layers\.1\.self_attn")}
    assert names == {n for n in exact if "layers.1.self_attn" in n}
    assert not any("o_proj" in i.name for i in likely_linear_weights(infos, keep_dense=("o_proj",)))


def test_vocabulary_sized_matrices_wait_for_the_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 7, "text_config": {"vocab_size": 9}}))
    assert config_vocab_sizes(tmp_path) == {7, 9}
    assert config_vocab_sizes(tmp_path / "missing") == set()


def test_a_wrong_guess_costs_time_never_bits(tiny_llama_dir: Path, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Guess every matrix, embeddings included: the repo must come out byte-identical to a plain run."""
    plain = convert(tiny_llama_dir, tmp_path / "plain", workers=1)

    def guess_everything(infos, **_):
        return [i for i in infos if len(i.shape) == 2]

    monkeypatch.setattr(conversion_api, "likely_linear_weights", guess_everything)
    seen: list[str] = []
    wide = convert(tiny_llama_dir, tmp_path / "wide", workers=1, on_tensor=lambda r: seen.append(r.name))
    manifest = json.loads((tmp_path / "plain" / "tpde_manifest.json").read_text())["tensors"]
    encoded = sorted(n for n, entry in manifest.items() if entry["encoded"])
    assert sorted(seen) == encoded and len(encoded) == plain.n_encoded == wide.n_encoded == 14
    assert "model.embed_tokens.weight" not in seen
    assert _weights_files(tmp_path / "wide") == _weights_files(tmp_path / "plain")
    assert_bit_exact_repo(tmp_path / "wide", source_tensors(tiny_llama_dir))


def test_selected_weights_the_guess_missed_are_encoded_after_the_plan(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conversion_api, "likely_linear_weights", lambda infos, **_: [])
    report = convert(tiny_llama_dir, tmp_path / "late", workers=1)
    assert report.n_encoded == report.verified_tensors == 14
    assert _weights_files(tmp_path / "late") == _weights_files(convert_plain(tiny_llama_dir, tmp_path))


def convert_plain(src: Path, tmp_path: Path) -> Path:
    out = tmp_path / "reference"
    if not out.exists():
        convert(src, out, workers=1)
    return out


# ==================================================================== task threads
def test_task_threads_run_one_task_during_the_plan_then_one_per_core(monkeypatch: pytest.MonkeyPatch) -> None:
    running, most = [0], [0]
    lock = threading.Lock()
    release = threading.Event()
    owned: list[bool] = []

    def fake_task(task, own_peak=None):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
            owned.append(own_peak)
        release.wait(5)
        time.sleep(0.01)
        with lock:
            running[0] -= 1
        return task

    monkeypatch.setattr(conversion_encoding, "run_task", fake_task)
    runner = _TaskThreads(3)
    try:
        early = [runner.submit(i) for i in range(4)]
        time.sleep(0.2)
        assert most[0] == 1  # the plan keeps the other cores
        release.set()
        runner.quiesce()  # waits for the task in flight, starts no other
        assert running[0] == 0 and sum(f.done() for f in early) >= 1
        started = len(owned)
        time.sleep(0.1)
        assert len(owned) == started
        runner.use_all_cores()
        late = [runner.submit(i) for i in range(6)]
        assert [f.result(5) for f in early + late] == list(range(4)) + list(range(6))
    finally:
        runner.shutdown()
    assert owned[0] is True  # alone: it may reset the peak-memory counter
    assert owned[-1] is False


def test_codec_thread_cap_is_per_thread_and_changes_no_byte() -> None:
    from tpde_hf.codec.compiled import codec_threads

    w = (torch.randn(300, 700) * 0.02).to(torch.bfloat16)
    seen = {}

    def capped():
        limit_codec_threads(1)
        seen["cap"] = (thread_limit(), codec_threads())
        seen["enc"] = encode_tensor(w, CodecParams())

    t = threading.Thread(target=capped)
    t.start()
    t.join()
    assert seen["cap"] == (1, 1) and thread_limit() is None  # this thread keeps its own setting
    ref = encode_tensor(w, CodecParams()).to_state_dict("x")
    got = seen["enc"].to_state_dict("x")
    assert all(torch.equal(ref[k], got[k]) for k in ref)


# ==================================================================== layout cache
def test_layout_cache_skips_the_build_and_gives_the_same_repo(tiny_llama_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TPDE_LAYOUT_CACHE", str(tmp_path / "cache"))
    first = convert(tiny_llama_dir, tmp_path / "a", workers=1)
    assert not first.layout_cached and len(list((tmp_path / "cache").glob("*.json"))) == 1

    def no_build(*_, **__):
        raise AssertionError("the layout should have come from the cache")

    monkeypatch.setattr(conversion_api, "load_layout", no_build)
    second = convert(tiny_llama_dir, tmp_path / "b", workers=1)
    assert second.layout_cached and second.modules_to_not_convert == first.modules_to_not_convert
    assert _weights_files(tmp_path / "a") == _weights_files(tmp_path / "b")
    assert json.loads((tmp_path / "a" / "config.json").read_text()) == json.loads(
        (tmp_path / "b" / "config.json").read_text())
    assert verify_repo(tmp_path / "b").ok


def test_layout_cache_key_follows_the_config_and_damaged_entries_are_rebuilt(
    make_tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TPDE_LAYOUT_CACHE", str(tmp_path / "cache"))
    src = make_tiny(tmp_path / "src")
    key = layout_cache.layout_key(src, False)
    assert key != layout_cache.layout_key(src, True)
    built: list[Path] = []

    def counting_build(folder, **kw):
        built.append(folder)
        return load_layout(folder, **kw)

    layout, hit = layout_cache.cached_layout(src, trust_remote_code=False, build=counting_build)
    assert not hit and len(built) == 1
    again, hit = layout_cache.cached_layout(src, trust_remote_code=False, build=counting_build)
    assert hit and len(built) == 1 and again == layout

    entry = tmp_path / "cache" / f"{key}.json"
    entry.write_text("{not json")
    _, hit = layout_cache.cached_layout(src, trust_remote_code=False, build=counting_build)
    assert not hit and len(built) == 2 and json.loads(entry.read_text())["linear"] == sorted(layout.linear)

    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = 1  # another architecture instance: another key
    (src / "config.json").write_text(json.dumps(cfg))
    assert layout_cache.layout_key(src, False) != key
    fewer, hit = layout_cache.cached_layout(src, trust_remote_code=False, build=counting_build)
    assert not hit and fewer.linear < layout.linear

    key_without_code = layout_cache.layout_key(src, False)
    (src / "modeling_custom.py").write_text("# custom code changes the key too\n")
    key_with_code = layout_cache.layout_key(src, False)
    assert key_with_code != key_without_code
    (src / "modeling_custom.py").write_text("# edited\n")
    assert layout_cache.layout_key(src, False) != key_with_code


def test_layout_cache_can_be_turned_off(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TPDE_LAYOUT_CACHE", "off")
    assert layout_cache.cache_dir() is None
    for out in ("a", "b"):
        assert not convert(tiny_llama_dir, tmp_path / out, workers=1).layout_cached


def test_task_files_are_written_in_one_pass_with_their_hashes(tmp_path: Path) -> None:
    from tpde_hf.conversion.streaming import bytes_checksum, iter_bytes, write_tensor_file

    tensors = {"b": torch.arange(10, dtype=torch.int16), "a": torch.randn(3, 5), "empty": torch.zeros(0)}
    path = tmp_path / "t.safetensors"
    hashes = write_tensor_file(path, tensors, metadata={"k": "v"})
    header = read_header(path)
    assert set(hashes) == set(tensors) and not list(tmp_path.glob("*.tmp"))
    for name in tensors:
        assert hashes[name] == bytes_checksum(iter_bytes(header[name]))
    from safetensors.torch import load_file

    back = load_file(path)
    assert all(torch.equal(back[k], tensors[k]) for k in tensors)


def test_shard_copies_are_checked_byte_for_byte(tmp_path: Path) -> None:
    from tpde_hf.conversion.streaming import (
        bytes_checksum,
        iter_bytes,
        verify_file_copies,
        write_planned_shard,
        write_tensor_file,
    )

    src = tmp_path / "src.safetensors"
    write_tensor_file(src, {"a": torch.randn(64, 64), "b": torch.arange(100, dtype=torch.int16)})
    infos = list(read_header(src).values())
    shard = tmp_path / "shard.safetensors"
    hashes = write_planned_shard(shard, infos, hashed={"b"})
    assert set(hashes) == {"b"} and hashes["b"] == bytes_checksum(iter_bytes(read_header(src)["b"]))
    sources = {i.name: i for i in infos}
    assert verify_file_copies(shard, sources) == []
    data = bytearray(shard.read_bytes())
    data[read_header(shard)["a"].begin + 5] ^= 0x10
    shard.write_bytes(bytes(data))
    assert verify_file_copies(shard, sources) == ["a"]
    extra = dict(sources, c=sources["b"])
    assert verify_file_copies(shard, extra) == ["c", "a"]


def test_an_unusable_layout_cache_never_stops_a_conversion(tiny_llama_dir: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    not_a_folder = tmp_path / "cache-is-a-file"
    not_a_folder.write_text("x")
    monkeypatch.setenv("TPDE_LAYOUT_CACHE", str(not_a_folder))
    report = convert(tiny_llama_dir, tmp_path / "out", workers=1)
    assert not report.layout_cached and report.verified_tensors == 14 and not_a_folder.read_text() == "x"

    cache = tmp_path / "cache"
    monkeypatch.setenv("TPDE_LAYOUT_CACHE", str(cache))
    cache.mkdir()
    entry = cache / f"{layout_cache.layout_key(tiny_llama_dir, False)}.json"
    entry.write_text(json.dumps({"entry": 999, "linear": []}))  # another format version: rebuilt, not trusted
    layout, hit = layout_cache.cached_layout(tiny_llama_dir, trust_remote_code=False, build=load_layout)
    assert not hit and len(layout.linear) == 15
    assert json.loads(entry.read_text())["entry"] == layout_cache._ENTRY_VERSION
