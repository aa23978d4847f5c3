"""The early start of a delta repo's decode (:mod:`tpde_hf.reference.early`): what happens when the load that
started it fails before adopting it."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

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
