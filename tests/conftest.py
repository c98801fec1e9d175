"""Shared fixtures: the real SmolLM2 (converted once into the GRASS cache) and tiny
random-weight models of several architectures that reuse its tokenizer, so tests
exercise real chat templates at a fraction of the compute."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip where there is no CUDA device (so the default
    `pytest -q` passes on a CPU machine); `pytest -m cuda` selects only them."""
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is false)")
    for item in marked:
        item.add_marker(skip)


# Tiny configs: 4 blocks, hidden 32, the SmolLM2 vocabulary (49152 tokens).
TINY_CONFIGS = {
    "llama": (
        "LlamaConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
        ),
    ),
    "qwen2": (
        "Qwen2Config",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        ),
    ),
    "mistral": (
        "MistralConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        ),
    ),
    "gemma": (
        "GemmaConfig",
        dict(
            hidden_size=32,
            intermediate_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
        ),
    ),
    "gpt2": ("GPT2Config", dict(n_embd=32, n_head=4, n_positions=512)),
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(hidden_size=32, intermediate_size=64, num_attention_heads=4),
    ),
}
LAYER_KEY = {"gpt2": "n_layer"}


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as an HF folder (converted once, cached)."""
    from grass_cli.models import resolve_model_path
    from grass_cli.recipe import EMBEDDED_SMOLLM2

    return Path(resolve_model_path(EMBEDDED_SMOLLM2))


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir: Path):
    from grass_cli.models import load_tokenizer

    return load_tokenizer(str(smollm2_dir))


def make_tiny_model(folder: Path, arch: str, tokenizer, num_layers: int = 4, seed: int = 0) -> Path:
    """Save a tiny random-weight causal LM of `arch` with the SmolLM2 tokenizer."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, kwargs = TINY_CONFIGS[arch]
    cfg_cls = getattr(transformers, cls_name)
    kw = dict(kwargs)
    kw[LAYER_KEY.get(arch, "num_hidden_layers")] = num_layers
    cfg = cfg_cls(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **kw,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama", tokenizer)


@pytest.fixture(scope="session")
def tiny_factory(tmp_path_factory, tokenizer):
    cache: dict[tuple[str, int], Path] = {}

    def make(arch: str, num_layers: int = 4) -> Path:
        key = (arch, num_layers)
        if key not in cache:
            folder = tmp_path_factory.mktemp("tiny") / f"{arch}-{num_layers}"
            cache[key] = make_tiny_model(folder, arch, tokenizer, num_layers)
        return cache[key]

    return make
