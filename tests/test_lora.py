"""The LoRA baseline (`sampler.strategy: lora`): only adapters train, the saved model
is a plain merged HF model, resume is exact, and the recipe refuses what cannot work."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from helpers import ListSink
from test_checkpoint import EVAL, make_recipe, metrics, run_interrupted, run_straight
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from grass_cli.checkpoint import find_latest, verify
from grass_cli.cli import app
from grass_cli.engine import setup, train
from grass_cli.errors import RecipeError
from grass_cli.lora import lora_rank_for, lora_trainable_params, target_module_names
from grass_cli.recipe import LoraConfig, validate_dict
from grass_cli.telemetry import Telemetry


def is_adapter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def lora_recipe(model_dir, out, **sections):
    sections.setdefault("lora", {"r": 4, "alpha": 8})
    return make_recipe(model_dir, out, "lora", **sections)


def test_only_adapters_train_and_counts_agree(tiny_factory, tmp_path):
    model_dir = tiny_factory("llama", 4)
    rec = lora_recipe(model_dir, tmp_path / "run", training={"max_steps": 3, "eval_interval": None})
    sink = ListSink()
    r = setup(rec, Telemetry([sink]), overwrite=True)
    before = {n: p.detach().clone() for n, p in r.model.named_parameters()}
    train(r)
    adapters = [n for n in before if is_adapter(n)]
    assert adapters
    for name, p in r.model.named_parameters():
        if is_adapter(name):
            assert not torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name]), name  # base weights bit-identical

    # Each block's group holds exactly its own adapters; nothing else ever trains.
    assert r.always_train == []
    for g in r.block_map.blocks:
        assert g.params and all(is_adapter(n) for n, _ in g.params)
        assert all(n.startswith(f"{r.block_map.blocks_path}.{g.index}.") for n, _ in g.params)
    grouped = {n for g in r.block_map.blocks for n, _ in g.params}
    assert grouped == set(adapters)

    plain = AutoModelForCausalLM.from_pretrained(model_dir)
    expected = lora_trainable_params(plain, rec.lora)
    assert expected == sum(before[n].numel() for n in adapters)
    steps = sink.of("step")
    assert [e["trainable_params"] for e in steps] == [expected] * 3
    assert all(e["active"] == [0, 1, 2, 3] for e in steps)  # the full sampler
    assert steps[-1]["optimizer_state_bytes"] == 2 * 4 * expected  # two fp32 AdamW moments
    assert not sink.of("probe")
    start = sink.of("start")[0]
    assert start["strategy"] == "lora"
    assert start["params"] == sum(p.numel() for p in plain.parameters()) + expected
    # MGN of the adapter gradients is tracked for every block.
    assert all(v == v for v in steps[-1]["importance"])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # peft's own calls into transformers
def test_final_model_is_merged_plain_hf_and_adapter_is_saved(tiny_factory, tmp_path):
    model_dir = tiny_factory("llama", 4)
    rec = lora_recipe(
        model_dir,
        tmp_path / "run",
        training={"max_steps": 3, "eval_interval": None},
        output={"save_model": True},
    )
    r, _ = run_straight(rec)
    final = tmp_path / "run/final"
    assert (final / "adapter/adapter_config.json").exists()
    assert (final / "adapter/adapter_model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(final).eval()
    plain = AutoModelForCausalLM.from_pretrained(model_dir)
    # A plain model: the original parameter names, no base_layer / lora_ left over.
    assert set(loaded.state_dict()) == set(plain.state_dict())
    merged = copy.deepcopy(r.peft_model).merge_and_unload().eval()
    ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
        assert torch.allclose(got, merged(input_ids=ids).logits, atol=1e-5)
        r.model.eval()  # the trained model with its adapters unmerged
        assert torch.allclose(got, r.model(input_ids=ids).logits, atol=1e-5)
        # and it is not just the base model: the adapters changed the function
        assert not torch.allclose(got, plain.eval()(input_ids=ids).logits, atol=1e-5)
        # The small adapter on top of the base model gives the same model back.
        from peft import PeftModel

        fresh = AutoModelForCausalLM.from_pretrained(model_dir)
        adapted = PeftModel.from_pretrained(fresh, final / "adapter").eval()
        assert torch.allclose(got, adapted(input_ids=ids).logits, atol=1e-5)

    # The end-of-training checkpoint is a loadable HF folder too, for `grass eval`.
    ckpt = find_latest(tmp_path / "run")
    assert {"model.safetensors", "adapter/adapter_model.safetensors"} <= set(verify(ckpt)["files"])
    res = CliRunner().invoke(
        app, ["eval", str(ckpt), "--data", EVAL, "--kind", "loss", "--limit", "2", "--json"]
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["rows"] == 2


def test_resume_is_bit_identical(tiny_factory, tmp_path):
    model_dir = tiny_factory("gpt2", 4)  # GPT-2's Conv1D layers; dropout: RNG matters
    lora = {"r": 4, "alpha": 8, "dropout": 0.1}
    a, ra = run_straight(lora_recipe(model_dir, tmp_path / "a", lora=lora))
    b, rb = run_interrupted(lora_recipe(model_dir, tmp_path / "b", lora=lora), k=3)
    assert rb.losses == ra.losses and len(ra.losses) == 7
    assert rb.eval_losses == ra.eval_losses
    pa = dict(a.model.named_parameters())
    n_adapters = 0
    for name, p in b.model.named_parameters():
        assert torch.equal(p, pa[name]), name
        n_adapters += is_adapter(name)
    assert n_adapters == 4 * 4 * 2  # 4 blocks x (c_attn, c_proj, c_fc, mlp.c_proj) x (A, B)
    steps = [e for e in metrics(tmp_path / "b") if e["event"] == "step"]
    assert [e["step"] for e in steps] == list(range(7))
    assert [e["loss"] for e in steps] == ra.losses


BASE = {"data": {"train": "t.jsonl"}, "sampler": {"strategy": "lora"}}


@pytest.mark.parametrize("policy", ["drop", "offload"])
def test_lora_refuses_state_policies_other_than_keep(policy):
    with pytest.raises(RecipeError, match=f"state_policy is {policy} but sampler.strategy lora"):
        validate_dict({**BASE, "optimizer": {"state_policy": policy}}, "r.yaml")


def test_lora_section_keys_and_defaults():
    r = validate_dict(BASE, "r.yaml")
    assert r.lora == LoraConfig()  # resolved, so recipe.yaml shows what ran
    assert "lora:" in r.to_yaml()
    assert validate_dict({"data": {"train": "t.jsonl"}}, "r.yaml").lora is None
    with pytest.raises(RecipeError, match=r"lora.rank: unknown key \(did you mean 'lora.r'\?\)"):
        validate_dict({**BASE, "lora": {"rank": 8}}, "r.yaml")
    with pytest.raises(RecipeError, match="lora.target_modules: must be all-linear or a non-empty"):
        validate_dict({**BASE, "lora": {"target_modules": "q_proj"}}, "r.yaml")
    with pytest.raises(RecipeError, match="lora.dropout"):
        validate_dict({**BASE, "lora": {"dropout": 1.0}}, "r.yaml")
    assert validate_dict({**BASE, "lora": {"target_modules": ["q_proj"]}}, "r.yaml").lora


def test_parameter_count_helper(tiny_factory):
    model = AutoModelForCausalLM.from_pretrained(tiny_factory("llama", 4))
    n8 = lora_trainable_params(model, LoraConfig(r=8))
    n16 = lora_trainable_params(model, LoraConfig(r=16))
    assert n16 == 2 * n8 > 0
    assert lora_rank_for(model, n16) == 16
    # hidden 32, kv 16, intermediate 64: q, o (32+32), k, v (32+16), gate, up, down (32+64)
    assert lora_trainable_params(model, LoraConfig(r=1)) == 4 * (2 * 64 + 2 * 48 + 3 * 96)
    only_q = LoraConfig(r=1, target_modules=["self_attn.q_proj"])
    assert lora_trainable_params(model, only_q) == 4 * 64
    assert len(target_module_names(model, only_q)) == 4
    with pytest.raises(RecipeError, match=r"\['qkv'\] match no linear layer"):
        target_module_names(model, LoraConfig(target_modules=["q_proj", "qkv"]))
