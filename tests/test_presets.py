"""Model presets: each one's shape builds into the model its card describes, its chat
template renders, and a preset name works as model.path and --model-config."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from grass_cli.cli import app
from grass_cli.errors import GrassError
from grass_cli.presets import find_preset, get_preset, is_preset_name, preset_names
from grass_cli.recipe import validate_dict

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "data/quickstart/train.jsonl")
# the families issue 37 asks for, by name
WANTED = {
    "llama-3.2-1b",
    "llama-3.2-3b",
    "llama-3.1-8b",
    "qwen2.5-0.5b",
    "qwen2.5-7b",
    "qwen2.5-14b",
    "qwen3-0.6b",
    "qwen3-8b",
    "qwen3-14b",
    "mistral-7b",
    "gemma-2-2b",
    "gemma-2-9b",
    "gemma-3-4b",
    "smollm2-360m",
    "smollm2-1.7b",
    "phi-3-mini",
    "phi-4-mini",
}


def test_the_families_users_ask_for_are_shipped():
    assert set(preset_names()) >= WANTED


@pytest.mark.parametrize("name", preset_names())
def test_each_preset_builds_to_its_published_size(name):
    """Built on the meta device from the shipped config, the model has the parameter
    count the model card gives (within 1%): a wrong width or layer count shows."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    p = get_preset(name, "test")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**p.config))
    built = sum(t.numel() for t in model.parameters()) / 1e9
    assert abs(built - p.params_b) / p.params_b < 0.01, (name, built, p.params_b)
    assert p.hub_id.count("/") == 1 and p.config_source.startswith("https://")
    assert set(p.lr) >= {"grass", "full", "lora"} and p.lr_source
    assert all(1e-6 <= v <= 1e-3 for v in p.lr.values())


@pytest.mark.parametrize("name", preset_names())
def test_each_chat_template_renders_a_conversation(name):
    from transformers.utils.chat_template_utils import render_jinja_template

    p = get_preset(name, "test")
    text = p.template_text()
    assert text is not None, p.chat_template
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    rendered, _ = render_jinja_template(
        [chat], chat_template=text, bos_token="<s>", eos_token="</s>"
    )
    out = rendered[0]
    assert "What is 2+2?" in out and out.index("What is 2+2?") < out.rindex("4")
    prompt, _ = render_jinja_template(
        [chat[1:2]],
        chat_template=text,
        add_generation_prompt=True,
        bos_token="<s>",
        eos_token="</s>",
    )
    assert len(prompt[0]) > len("What is 2+2?")  # the turn markers, and the assistant's cue


def test_names_aliases_and_hub_ids_find_the_preset():
    assert find_preset("Llama-3.1-8B").name == "llama-3.1-8b"
    assert find_preset("meta-llama/Llama-3.1-8B-Instruct").name == "llama-3.1-8b"
    assert is_preset_name("qwen2.5-7b") and not is_preset_name("Qwen/Qwen2.5-7B-Instruct")
    with pytest.raises(GrassError) as e:
        get_preset("llama-3.1-9b", "--model-config")
    assert "did you mean llama-3.1-8b" in str(e.value)


def test_a_preset_as_model_path_plans_and_validates_without_the_hub(tmp_path, monkeypatch):
    """model.path: a preset name. validate and plan read the shipped shape: no weight,
    no network (HF_HUB_OFFLINE), and the 8B's size is the planner's."""
    from grass_cli.planner.memory import plan_recipe

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    r = validate_dict(
        {
            "model": {"path": "llama-3.1-8b", "dtype": "bfloat16"},
            "data": {"train": TRAIN},
            "output": {"dir": str(tmp_path / "run"), "save_model": False},
            "checkpoint": {"at_end": False},
        },
        "r.yaml",
    )
    lay, _ = plan_recipe(r, all_scenarios=False)
    assert lay.name == "llama-3.1-8b" and abs(lay.params - 8.03e9) < 0.01e9
    path = tmp_path / "r.yaml"
    path.write_text(r.to_yaml())
    res = CliRunner().invoke(app, ["validate", str(path)])
    assert res.exit_code == 0, res.output
    assert "8030M parameters" in res.stderr


def test_a_preset_resolves_to_its_hub_id_for_training():
    from grass_cli.models import resolve_model_path

    assert resolve_model_path("qwen2.5-0.5b") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_train_checks_a_preset_model_can_be_had_before_anything_loads(tmp_path, monkeypatch):
    """Offline, with the model not cached: train stops in pre-flight with the hub's
    message, naming the preset and its hub id; validate (the plan only) passes."""
    from grass_cli.planner.shape import load_config

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    r = validate_dict({"model": {"path": "qwen2.5-0.5b"}, "data": {"train": TRAIN}}, "r.yaml")
    load_config(r)  # the shipped shape
    with pytest.raises(GrassError) as e:
        load_config(r, download=True)
    assert "model.path: qwen2.5-0.5b (preset of Qwen/Qwen2.5-0.5B-Instruct)" in str(e.value)
    assert "HF_HUB_OFFLINE is set" in str(e.value)


def test_model_config_takes_a_hub_id_from_the_local_cache(tmp_path):
    """--model-config ORG/NAME reads only config.json, from a real Hugging Face cache
    layout (a snapshot folder and refs/main), with the hub unreachable (offline)."""
    import json
    import os
    import subprocess
    import sys

    from grass_cli.presets import get_preset

    cache = tmp_path / "hub"
    snap = cache / "models--someorg--tiny-llama" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    config = dict(get_preset("tinyllama-1.1b", "t").config, num_hidden_layers=3)
    (snap / "config.json").write_text(json.dumps(config))
    (cache / "models--someorg--tiny-llama" / "refs").mkdir()
    (cache / "models--someorg--tiny-llama" / "refs" / "main").write_text("a" * 40)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    args = ["plan", str(ROOT / "recipes/quickstart.yaml"), "--model-config"]
    run = [sys.executable, "-m", "grass_cli", *args]
    out = subprocess.run(
        [*run, "someorg/tiny-llama", "--json"], env=env, capture_output=True, text=True
    )
    assert out.returncode in (0, 1), out.stderr  # 1: this machine's disk or RAM verdict
    rows = json.loads(out.stdout)
    assert rows[0]["label"] == "full" and rows[0]["kinds"]["weights"] > 0
    out = subprocess.run([*run, "someorg/not-cached"], env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "--model-config someorg/not-cached" in out.stderr
    assert "HF_HUB_OFFLINE is set" in out.stderr
