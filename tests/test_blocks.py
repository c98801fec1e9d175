"""Block discovery and parameter groups across architectures."""

from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM

from grass_cli.errors import ModelError
from grass_cli.sampling.blocks import build_block_map

ARCHS = {
    # arch: (blocks path, tied embeddings/head)
    "llama": ("model.layers", True),
    "qwen2": ("model.layers", False),
    "mistral": ("model.layers", False),
    "gemma": ("model.layers", True),
    "gpt2": ("transformer.h", True),
    "gpt_neox": ("gpt_neox.layers", False),
}


def check_partition(model, bm):
    """Every parameter is in exactly one group."""
    seen: dict[int, str] = {}
    for g in bm.groups():
        for _, p in g.params:
            assert id(p) not in seen, f"{g.name} and {seen[id(p)]} share a parameter"
            seen[id(p)] = g.name
    all_ids = {id(p) for p in model.parameters()}
    assert set(seen) == all_ids
    assert sum(g.numel for g in bm.groups()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", list(ARCHS))
def test_block_discovery(arch, tiny_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_factory(arch, num_layers=3))
    bm = build_block_map(model)
    path, tied = ARCHS[arch]
    assert bm.blocks_path == path
    assert bm.num_blocks == 3
    assert [b.name for b in bm.blocks] == ["block.0", "block.1", "block.2"]
    assert bm.tied is tied
    assert (bm.head is None) is tied
    assert bm.embed is not None and bm.norm is not None
    check_partition(model, bm)
    # Block params really are the layers' params.
    layer_params = (
        sum(p.numel() for p in model.get_decoder().layers[0].parameters())
        if hasattr(model.get_decoder(), "layers")
        else None
    )
    if layer_params is not None:
        assert bm.blocks[0].numel == layer_params


def test_gpt2_position_embeddings_join_embed_group(tiny_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_factory("gpt2", num_layers=2))
    bm = build_block_map(model)
    names = [n for n, _ in bm.embed.params]
    assert "transformer.wte.weight" in names and "transformer.wpe.weight" in names
    assert [n for n, _ in bm.norm.params] == ["transformer.ln_f.weight", "transformer.ln_f.bias"]


def test_always_train_and_tied(tiny_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_factory("llama", num_layers=2))
    bm = build_block_map(model)
    assert [g.name for g in bm.always_train(False, True, False)] == ["norm"]
    # tied: turning on the head trains the shared embed group
    assert [g.name for g in bm.always_train(False, False, True)] == ["embed"]
    untied = build_block_map(AutoModelForCausalLM.from_pretrained(tiny_factory("qwen2", 2)))
    assert [g.name for g in untied.always_train(True, True, True)] == ["embed", "norm", "head"]


def test_blocks_attr_override(tiny_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_factory("llama", num_layers=2))
    assert build_block_map(model, "model.layers").num_blocks == 2
    with pytest.raises(ModelError, match="the model has no attribute 'model.blocks'"):
        build_block_map(model, "model.blocks")
    with pytest.raises(ModelError, match="not a non-empty ModuleList"):
        build_block_map(model, "model.norm")


@pytest.mark.slow
def test_smollm2_blocks(smollm2_dir):
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    bm = build_block_map(model)
    assert bm.num_blocks == 30 and bm.tied and bm.head is None
    check_partition(model, bm)
    assert sum(g.numel for g in bm.groups()) == 134_515_008
    assert bm.embed.numel == 49152 * 576
