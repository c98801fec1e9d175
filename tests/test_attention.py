"""model.attn_implementation: passed to transformers, same loss either way, refused early."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_dashboard import screen, synthetic_run
from typer.testing import CliRunner

from grass_cli import attention
from grass_cli.cli import app
from grass_cli.errors import ModelError
from grass_cli.models import load_model_and_tokenizer
from grass_cli.recipe import ModelConfig, validate_dict
from grass_cli.telemetry.dashboard import DashboardState
from grass_cli.telemetry.panels import render_header
from grass_cli.telemetry.sinks import PlainPrinter

ROOT = Path(__file__).resolve().parent.parent
runner = CliRunner()


def loss_with(model_dir: Path, impl: str | None) -> tuple[float, str]:
    model, tok, _ = load_model_and_tokenizer(
        ModelConfig(path=str(model_dir), attn_implementation=impl)
    )
    # two rows of different lengths: padding (a masked key) is what kernels differ on
    batch = tok(["The quick brown fox jumps", "Hi"], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(**batch, labels=labels)
    return float(out.loss), model.config._attn_implementation


def test_eager_and_sdpa_give_the_same_loss(tiny_llama):
    eager, used_eager = loss_with(tiny_llama, "eager")
    sdpa, used_sdpa = loss_with(tiny_llama, "sdpa")
    default, used_default = loss_with(tiny_llama, None)
    assert (used_eager, used_sdpa, used_default) == ("eager", "sdpa", "sdpa")
    assert sdpa == pytest.approx(eager, rel=1e-5, abs=1e-6)
    assert default == sdpa


def recipe(tmp_path: Path, model_dir: Path, impl: str, **training) -> Path:
    import yaml

    data = {
        "model": {"path": str(model_dir), "attn_implementation": impl},
        "data": {"train": str(ROOT / "data/quickstart/train.jsonl"), "limit": 8},
        "training": {"max_steps": 1, **training},
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_flash_attention_without_its_package_is_refused_before_loading(tiny_llama, tmp_path):
    if attention._installed("flash_attn"):
        pytest.skip("flash_attn is installed here")
    rec = recipe(tmp_path, tiny_llama, "flash_attention_2", device="cuda")
    for command in (["validate", str(rec)], ["train", str(rec), "--no-live"]):
        res = runner.invoke(app, command)
        assert res.exit_code == 2, res.output
        assert (
            "model.attn_implementation: flash_attention_2: flash_attention_2 needs the "
            "flash_attn package, which is not installed"
        ) in res.stderr
        assert "pip install flash-attn" in res.stderr and "sdpa" in res.stderr
    assert not (tmp_path / "run").exists()
    # every command that loads a model checks too, before reading a weight
    with pytest.raises(ModelError, match="needs the flash_attn package"):
        load_model_and_tokenizer(
            ModelConfig(path="/nonexistent", attn_implementation="flash_attention_2")
        )


def test_flash_attention_on_a_cpu_or_in_float32_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(attention, "_installed", lambda module: True)  # as if installed
    rec = validate_dict(
        {
            "model": {"attn_implementation": "flash_attention_2"},
            "data": {"train": "t.jsonl"},
            "training": {"device": "cpu"},
        },
        "r.yaml",
    )
    with pytest.raises(ModelError) as err:
        attention.check_recipe(rec)
    assert "flash_attention_2 runs only on a CUDA GPU, and this run's device is cpu" in str(
        err.value
    )
    with pytest.raises(ModelError, match="computes in bfloat16 or float16 only"):
        attention.check_attention("flash_attention_2", "cuda", half=False)
    attention.check_attention("flash_attention_2", "cuda", half=True)  # runs
    attention.check_attention("flash_attention_3", "cuda", half=None)  # dtype auto: unknown


def test_a_model_without_the_kernel_is_one_clear_error(tiny_llama, monkeypatch):
    def refuse(*args, **kwargs):
        raise ValueError('GPT2 does not support attn_implementation="flex_attention" yet')

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", refuse)
    with pytest.raises(ModelError) as err:
        load_model_and_tokenizer(
            ModelConfig(path=str(tiny_llama), attn_implementation="flex_attention")
        )
    assert str(err.value).startswith(
        "model.attn_implementation: flex_attention: this model cannot use flex_attention"
    )


def test_the_start_line_and_header_show_the_attention():
    start = dict(synthetic_run()[0], attention="sdpa")
    line = PlainPrinter(None).format(start)  # type: ignore[arg-type]
    assert line.endswith("device=cpu attention=sdpa")
    state = DashboardState()
    state.update(start)
    assert "cpu (sdpa)" in screen(render_header(state), 120, 10)
