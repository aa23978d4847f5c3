"""tpde_hf.gc_pause: nested pauses, the limit, the switch, and a delta load that gives the collector back."""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator

import pytest

from tpde_hf import gc_pause


@pytest.fixture(autouse=True)
def _collector_as_it_was() -> Iterator[None]:
    _settled()
    was = gc.isenabled()
    yield
    (gc.enable if was else gc.disable)()


def _settled(limit_s: float = 10.0) -> None:
    """Wait for pauses left by earlier tests' failed loads to end (their watchers end them within 0.05 s)."""
    deadline = time.monotonic() + limit_s
    while gc_pause.paused() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gc_pause.paused() == 0


@pytest.mark.parametrize("enabled", [True, False])
def test_nested_pauses_give_back_the_state_they_found(enabled: bool) -> None:
    (gc.enable if enabled else gc.disable)()
    first = gc_pause.pause()
    second = gc_pause.pause()
    assert not gc.isenabled() and gc_pause.paused() == 2
    first()
    first()  # a second call does nothing: the other pause still holds
    assert not gc.isenabled() and gc_pause.paused() == 1
    second()
    assert gc.isenabled() == enabled and gc_pause.paused() == 0


def test_a_pause_with_a_limit_ends_by_itself() -> None:
    gc.enable()
    release = gc_pause.pause(limit_s=0.05)
    assert not gc.isenabled()
    deadline = time.monotonic() + 5
    while not gc.isenabled() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert gc.isenabled() and gc_pause.paused() == 0
    release()  # after the limit: nothing left to end
    assert gc.isenabled() and gc_pause.paused() == 0


def test_the_switch_turns_pausing_off(monkeypatch: pytest.MonkeyPatch) -> None:
    gc.enable()
    monkeypatch.setenv("TPDE_GC_PAUSE", "0")
    release = gc_pause.pause()
    assert gc.isenabled() and gc_pause.paused() == 0
    release()
    assert gc.isenabled()


def test_a_delta_load_pauses_the_collector_while_it_decodes_and_gives_it_back(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """The reference load pauses the collector from its prefetch to ``close_reference_load``; the model is
    bit-exact and the collector is on again after ``from_pretrained``, also after a failed load."""
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from tpde_hf.reference import load as L
    from tpde_hf.reference import prefetch as P

    sys.path.insert(0, str(Path(__file__).parent))
    from test_reference import bits_equal, make_pair  # noqa: PLC0415

    from tpde_hf.reference.convert import convert_with_reference

    base, ft, _ = make_pair("llama", tmp_path)
    convert_with_reference(ft, tmp_path / "out", base, workers=1)
    seen: list[bool] = []
    real_take = P.Prefetch.take

    def take(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        seen.append(gc.isenabled())
        return real_take(self, *args, **kwargs)

    monkeypatch.setattr(P.Prefetch, "take", take)
    gc.enable()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert seen and not any(seen)  # paused while the weights were taken from the prefetch
    assert gc.isenabled() and gc_pause.paused() == 0
    want = AutoModelForCausalLM.from_pretrained(ft)
    for k, v in want.state_dict().items():
        assert bits_equal(model.state_dict()[k], v), k
    # a load that fails after its prefetch was built: the limit gives the collector back
    # a load that never reaches close_reference_load (it failed elsewhere): its watcher ends the pause once
    # from_pretrained has left the stack
    monkeypatch.setattr(L, "close_reference_load", lambda q: None)
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    _settled(limit_s=2.0)
    assert gc.isenabled()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_during_a_pause_starts_with_the_collector_on() -> None:
    """The thread that would end a pause is not copied into a forked child: the child starts unpaused, and the
    parent's pause is unaffected."""
    gc.enable()
    release = gc_pause.pause(limit_s=30)
    pid = os.fork()
    if pid == 0:  # the child: report and leave at once
        release()  # the parent's pause: nothing to end here
        os._exit(0 if gc.isenabled() and gc_pause.paused() == 0 else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert not gc.isenabled() and gc_pause.paused() == 1
    release()
    assert gc.isenabled() and gc_pause.paused() == 0
