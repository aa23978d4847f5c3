"""The early start of a delta repo's decode (:mod:`tpde_hf.reference.early`): what happens when the load that
started it fails before adopting it."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tpde_hf.reference import early

sys.path.insert(0, str(Path(__file__).parent))
from test_reference import bits_equal, make_pair  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_on_stack_finds_a_running_frame_and_not_a_finished_one() -> None:
    def outer() -> tuple[int, object]:
        frame = sys._getframe()
        assert early.on_stack(threading.get_ident(), id(frame), frame.f_code)
        return id(frame), frame.f_code

    frame_id, code = outer()
    assert not early.on_stack(threading.get_ident(), frame_id, code)
    assert not early.on_stack(-1, frame_id, code)  # no such thread


def test_failed_load_closes_the_early_prefetch(tmp_path: Path, monkeypatch) -> None:
    """A load that raises after ``config.json`` and before its quantizer adopts the early prefetch: the watcher
    closes it (nothing held until the next load); the next load adopts its own and is bit-exact."""
    from transformers import AutoModelForCausalLM

    import tpde_hf.reference.prefetch as P
    from tpde_hf.conversion import convert
    from tpde_hf.quantizer import TpdeHfQuantizer

    base, ft, tensors = make_pair("llama", tmp_path)
    convert(ft, tmp_path / "out", reference=base, workers=1)
    early.install()
    made: list[P.Prefetch] = []
    init = P.Prefetch.__init__

    def recording_init(self, *a, **k):
        made.append(self)
        init(self, *a, **k)

    monkeypatch.setattr(P.Prefetch, "__init__", recording_init)
    quantizer_init = TpdeHfQuantizer.__init__

    def failing_init(self, *a, **k):
        raise RuntimeError("the load fails before the quantizer")

    monkeypatch.setattr(TpdeHfQuantizer, "__init__", failing_init)
    with pytest.raises(RuntimeError, match="fails before the quantizer"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert len(made) == 1  # started at config.json
    deadline = time.monotonic() + 5
    while early._EARLY and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not early._EARLY
    assert made[0]._cancelled and made[0]._ready.wait(5) and made[0]._batch is None  # closed: results dropped
    monkeypatch.setattr(TpdeHfQuantizer, "__init__", quantizer_init)
    sd = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert len(made) == 2 and not early._EARLY  # the second load's own early prefetch, adopted
    for k, v in tensors.items():
        assert bits_equal(sd[k], v), k


def test_watcher_ends_after_adoption(tmp_path: Path) -> None:
    """A load that adopts its early prefetch leaves no watcher thread behind."""
    from transformers import AutoModelForCausalLM

    from tpde_hf.conversion import convert

    base, ft, tensors = make_pair("llama", tmp_path)
    convert(ft, tmp_path / "out", reference=base, workers=1)
    early.install()
    sd = AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    assert all(bits_equal(sd[k], v) for k, v in tensors.items())
    deadline = time.monotonic() + 5
    while any(t.name == "tpde-ref-early-watch" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not any(t.name == "tpde-ref-early-watch" for t in threading.enumerate())


def _repo(tmp_path: Path) -> tuple[list[str], object, dict]:
    import json

    from tpde_hf.conversion import convert
    from tpde_hf.reference.resolve import LoadReference

    base, ft, tensors = make_pair("llama", tmp_path)
    convert(ft, tmp_path / "out", reference=base, workers=1)
    info = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]["reference"]
    return [str(tmp_path / "out" / "model.safetensors")], LoadReference(info), tensors


@pytest.mark.parametrize("inline", [True, False])
def test_prefetch_inline_or_threaded_is_bit_exact(tmp_path: Path, inline: bool) -> None:
    """Prepared on the calling thread (the early start) or on its own thread: every tensor bit for bit."""
    from tpde_hf.reference.prefetch import Prefetch

    files, ref, tensors = _repo(tmp_path)
    pf = Prefetch(files, ref, workers=1, inline=inline)
    assert not inline or pf._ready.is_set()  # inline: prepared before the constructor returns
    blobs = pf._blobs()
    assert blobs
    for _, key, _, _, h in blobs:
        out = pf.take(h)
        assert out is not None and bits_equal(out, tensors[key]), key
    pf.close()


def test_prefetch_closed_while_preparing_drops_its_tensors(tmp_path: Path) -> None:
    """Closed at once (the load went another way): it prepares nothing more, holds no job list and hands out
    nothing."""
    from tpde_hf.reference.prefetch import Prefetch

    files, ref, _ = _repo(tmp_path)
    pf = Prefetch(files, ref, workers=1)
    pf.close()
    assert pf._ready.wait(10)
    deadline = time.monotonic() + 5
    while pf._batch is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pf._batch is None
    assert all(pf.take(h) is None for *_, h in pf._blobs())


# ==================================================================== a default-on wrapper: what it must not change
TPDE_THREADS = ("tpde-ref", "tpde-ref-early-watch", "tpde-ref-warm")


def _nothing_left_running(timeout: float = 10) -> bool:
    """Every tpde thread of a load has ended (the decode threads, the early start's watcher, the warm-up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(t.name in TPDE_THREADS for t in threading.enumerate()) and not early._EARLY:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def watch(monkeypatch):
    """Records the early starts (Prefetch objects built inline at ``config.json``) and the quantizer's adoptions."""
    import tpde_hf.reference.prefetch as P

    seen = {"early": [], "quantizer": [], "adopted": []}
    init, adopt = P.Prefetch.__init__, early.adopt

    def recording_init(self, *a, **k):
        seen["early" if k.get("inline") else "quantizer"].append(self)
        init(self, *a, **k)

    def recording_adopt(*a, **k):
        pf = adopt(*a, **k)
        seen["adopted"].append(pf)
        return pf

    monkeypatch.setattr(P.Prefetch, "__init__", recording_init)
    monkeypatch.setattr(early, "adopt", recording_adopt)
    early.install()
    return seen


def _delta(tmp_path: Path, kind: str = "llama") -> tuple[Path, dict]:
    from tpde_hf.conversion import convert

    base, ft, tensors = make_pair(kind, tmp_path)
    convert(ft, tmp_path / "out", reference=base, workers=1)
    return tmp_path / "out", tensors


def test_config_read_outside_a_load_starts_nothing(tmp_path: Path, watch) -> None:
    from transformers import AutoConfig, LlamaConfig

    out, _ = _delta(tmp_path)
    AutoConfig.from_pretrained(out)
    LlamaConfig.from_pretrained(out)
    assert watch["early"] == [] and _nothing_left_running()


def test_dense_and_standalone_tpde_repos_start_nothing(tmp_path: Path, watch) -> None:
    """Only a delta repo (``quantization_config.reference``) starts early; the others load as without the wrapper."""
    from transformers import AutoModelForCausalLM

    from tpde_hf.conversion import convert

    _, ft, tensors = make_pair("llama", tmp_path)
    convert(ft, tmp_path / "std", workers=1)  # a tpde repo without a reference
    sd = AutoModelForCausalLM.from_pretrained(ft).state_dict()
    assert all(bits_equal(sd[k], v) for k, v in tensors.items())
    AutoModelForCausalLM.from_pretrained(tmp_path / "std")
    assert watch["early"] == [] and watch["quantizer"] == [] and _nothing_left_running()


@pytest.mark.parametrize("how", ["dtype", "device_map", "subfolder", "concrete class", "local_files_only"])
def test_load_arguments_give_the_same_model(tmp_path: Path, watch, how: str) -> None:
    """Arguments that differ between the config read and the quantizer: the early prefetch is adopted (same files,
    reference and download arguments) and the model is the fine-tune bit for bit, cast as asked."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    out, tensors = _delta(tmp_path)
    kwargs: dict = {}
    cls, path = AutoModelForCausalLM, out
    if how == "dtype":
        kwargs["dtype"] = torch.float32
    elif how == "device_map":
        kwargs["device_map"] = "cpu"
    elif how == "subfolder":
        shutil.copytree(out, tmp_path / "repo" / "sub")
        path, kwargs["subfolder"] = tmp_path / "repo", "sub"
    elif how == "concrete class":
        cls = LlamaForCausalLM
    else:
        kwargs["local_files_only"] = True
    sd = cls.from_pretrained(path, **kwargs).state_dict()
    want = kwargs.get("dtype")
    for k, v in tensors.items():
        assert bits_equal(sd[k], v.to(want) if want else v), k
    assert len(watch["early"]) == 1 and watch["adopted"] == watch["early"] and watch["quantizer"] == []
    assert _nothing_left_running()


@pytest.mark.parametrize("how", ["variant", "use_safetensors"])
def test_other_weight_files_start_nothing_early(tmp_path: Path, watch, how: str) -> None:
    """``variant`` names other weight files than the ones found at ``config.json``; ``use_safetensors=False``
    asks for none: no early start (a variant that does not exist fails as it would without the wrapper)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    out, tensors = _delta(tmp_path)
    if how == "variant":
        for cls in (AutoModelForCausalLM, LlamaForCausalLM):  # reaches get_config_dict / only the concrete frame
            with pytest.raises(OSError):
                cls.from_pretrained(out, variant="v9")
    else:
        with pytest.raises(Exception):  # noqa: B017 (transformers' own error for a repo without .bin weights)
            AutoModelForCausalLM.from_pretrained(out, use_safetensors=False)
    assert watch["early"] == [] and _nothing_left_running()


def test_two_loads_in_parallel_threads(tmp_path: Path, watch) -> None:
    """Two delta repos loaded at once on two threads: each thread adopts its own early prefetch (a start on one
    thread does not cancel the other's), both bit-exact, nothing left running."""
    from transformers import AutoModelForCausalLM

    repos = [_delta(tmp_path / f"r{i}") for i in range(2)]
    results: dict[int, dict] = {}
    errors: list[BaseException] = []
    gate = threading.Barrier(2)

    def load(i: int) -> None:
        try:
            gate.wait()
            results[i] = AutoModelForCausalLM.from_pretrained(repos[i][0]).state_dict()
        except BaseException as exc:  # re-raised below, on the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    default = torch.get_default_dtype()
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        # transformers sets and restores torch's process-wide default dtype around building a model; two threads
        # doing it at once can leave it at bfloat16 (one restores what the other set), which would break every
        # later test that makes a float tensor
        torch.set_default_dtype(default)
    assert not errors, errors
    # transformers 5.25 builds a model under torch's process-wide default dtype: two loads at once on two threads
    # can give one of them float32 parameters (dense repos, no tpde: 1 load in 60, 2026-12-07). The values are what
    # tpde decodes: compared bit for bit in the fine-tune's dtype (bf16 -> fp32 -> bf16 is exact)
    for i, (_, tensors) in enumerate(repos):
        assert all(bits_equal(results[i][k].to(v.dtype), v) for k, v in tensors.items()), i
    assert len(watch["early"]) == 2 and all(pf is not None for pf in watch["adopted"])
    assert {id(p) for p in watch["adopted"]} == {id(p) for p in watch["early"]}
    assert _nothing_left_running()


def _hub_delta(tmp_path: Path, monkeypatch) -> tuple[Path, Path, dict, list]:
    """A delta repo against the Hub reference ``org/base`` at COMMIT; ``snapshot_download`` mocked (no network):
    its calls are recorded, and ``cached`` says whether the snapshot is in the cache (else only a download finds it)."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    from tpde_hf.reference.convert import convert_with_reference

    base, ft, tensors = make_pair("llama", tmp_path)
    snap = tmp_path / "snapshots" / COMMIT
    shutil.copytree(base, snap)
    calls: list = []
    state = {"cached": True}

    def fake_snapshot_download(repo_id: str, **kw):
        calls.append(dict(kw))
        if kw.get("local_files_only") and not state["cached"]:
            raise LocalEntryNotFoundError("not in the cache")
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    convert_with_reference(ft, tmp_path / "out", "org/base@main", workers=1)
    calls.clear()
    return tmp_path / "out", snap, tensors, [calls, state]


COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.mark.parametrize("offline", [False, True])
def test_hub_reference_in_the_cache_starts_early_without_the_network(tmp_path: Path, monkeypatch, watch,
                                                                     offline: bool) -> None:
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM

    out, _, tensors, (calls, _) = _hub_delta(tmp_path, monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    sd = AutoModelForCausalLM.from_pretrained(out, token="hf_x").state_dict()
    assert all(bits_equal(sd[k], v) for k, v in tensors.items())
    assert len(watch["early"]) == 1 and watch["adopted"] == watch["early"]
    assert calls and all(c["local_files_only"] and c["revision"] == COMMIT and c["token"] == "hf_x" for c in calls)
    assert _nothing_left_running()


def test_hub_reference_not_cached_is_never_downloaded_early(tmp_path: Path, monkeypatch, watch) -> None:
    """The reference is not in the cache: the early start asks the cache only and starts nothing; the quantizer's
    start downloads it (with the load's token), as without the wrapper."""
    from transformers import AutoModelForCausalLM

    out, _, tensors, (calls, state) = _hub_delta(tmp_path, monkeypatch)
    state["cached"] = False
    sd = AutoModelForCausalLM.from_pretrained(out, token="hf_x").state_dict()
    assert all(bits_equal(sd[k], v) for k, v in tensors.items())
    assert watch["early"] == [] and len(watch["quantizer"]) == 1
    assert calls[0]["local_files_only"] is True  # the early start's look-up: the cache only
    assert any(not c["local_files_only"] and c["token"] == "hf_x" for c in calls[1:])  # the load's own download
    assert _nothing_left_running()


def test_hub_repo_not_downloaded_starts_nothing(tmp_path: Path, monkeypatch) -> None:
    """A Hub repo id whose weights are not in the cache: no file to start from (this never downloads)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert early.weight_files("org/not-downloaded", cache_dir=str(tmp_path)) == []


def test_partial_reference_snapshot_is_not_used_early(tmp_path: Path, monkeypatch, watch) -> None:
    """A cached snapshot that lacks a weight file (an online resolution would download it): no early start."""
    from transformers import AutoModelForCausalLM

    out, snap, tensors, _ = _hub_delta(tmp_path, monkeypatch)
    (snap / "model.safetensors").rename(tmp_path / "moved.safetensors")
    from tpde_hf.reference.resolve import LoadReference

    info = json.loads((out / "config.json").read_text())["quantization_config"]["reference"]
    assert not LoadReference(info).resolve_cached()
    (tmp_path / "moved.safetensors").rename(snap / "model.safetensors")
    assert LoadReference(info).resolve_cached()
    sd = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert all(bits_equal(sd[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("revision", [None, "main", COMMIT])
def test_hub_delta_repo_in_the_cache_is_adopted(tmp_path: Path, monkeypatch, watch, revision: str | None) -> None:
    """A delta repo loaded by Hub id from the Hugging Face cache (offline: nothing is downloaded): its weight files
    are found in the cache at config.json, the quantizer adopts that prefetch, the model is bit-exact."""
    from transformers import AutoModelForCausalLM

    out, tensors = _delta(tmp_path)
    cache = tmp_path / "cache"
    repo = cache / "models--org--ft"
    shutil.copytree(out, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    kwargs = {"revision": revision} if revision else {}
    sd = AutoModelForCausalLM.from_pretrained("org/ft", cache_dir=cache, **kwargs).state_dict()
    assert all(bits_equal(sd[k], v) for k, v in tensors.items())
    assert len(watch["early"]) == 1 and watch["adopted"] == watch["early"] and watch["quantizer"] == []
    assert _nothing_left_running()
