"""The planner's and pre-flight's verdicts against a machine: the part to lower is
named correctly, host RAM and disk are checked with what dominates, and settings
that do nothing are warned about. Real conditions: this machine's RAM, disk and
(lack of) CUDA, not mocks."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from typer.testing import CliRunner

from grass_cli.cli import app
from grass_cli.planner.memory import plan_recipe
from grass_cli.recipe import validate_dict

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "data/quickstart/train.jsonl")
runner = CliRunner()
NO_CUDA = not torch.cuda.is_available()


def recipe(tmp_path: Path, **sections) -> dict:
    rec = {
        "model": {"path": "llama-3.1-8b", "dtype": "bfloat16"},
        "data": {"train": TRAIN, "max_length": 512},
        "optimizer": {"state_policy": "offload", "offload": {"residency": "step"}},
        "training": {"micro_batch_size": 1, "device": "cuda"},
        "output": {"dir": str(tmp_path / "run"), "save_model": False},
        "checkpoint": {"at_end": False},
    }
    for name, values in sections.items():
        rec.setdefault(name, {}).update(values)
    return rec


def write(tmp_path: Path, rec: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rec))
    return path


def test_activations_not_weights_are_named_when_they_overflow(tmp_path):
    """8B in bf16, 4 x 4096 tokens without checkpointing on 24 GB: the weights are
    the largest part but fit; what to lower is the activations, and bfloat16 (the
    dtype already) is not suggested."""
    r = validate_dict(
        recipe(tmp_path, data={"max_length": 4096}, training={"micro_batch_size": 4}), "r.yaml"
    )
    _, (p,) = plan_recipe(r, device_memory_gb=24, all_scenarios=False)
    assert p.kinds["weights"] > p.kinds["activations"] / 10 and not p.fits
    assert p.dominant == "activations"
    assert "turn on model.gradient_checkpointing" in p.advice
    assert "training.micro_batch_size (now 4" in p.advice and "(now 4096)" in p.advice
    assert "bfloat16" not in p.advice


@pytest.mark.parametrize(
    ("dtype", "advice"),
    [("float32", "use model.dtype: bfloat16"), ("bfloat16", "use a bigger device")],
)
def test_weights_are_blamed_only_when_they_alone_overflow(tmp_path, dtype, advice):
    r = validate_dict(recipe(tmp_path, model={"dtype": dtype}), "r.yaml")
    _, (p,) = plan_recipe(r, device_memory_gb=12, all_scenarios=False)
    assert p.dominant == "weights" and advice in p.advice
    if dtype == "bfloat16":
        assert "bfloat16" not in p.advice


def test_plan_checks_host_ram_and_says_what_to_change(tmp_path):
    """The 8B recipe's pinned store (84 GB) on a 32 GB machine, all pinned
    (host_budget: null): fits the 24 GB GPU but not the host; the command exits 1 and
    points at the disk target. With 128 GB it fits both and exits 0."""
    rec = recipe(tmp_path, optimizer={"offload": {"residency": "step", "host_budget": None}})
    path = write(tmp_path, rec)
    args = ["plan", str(path), "--device-memory", "24"]
    res = runner.invoke(app, [*args, "--host-memory", "32"])
    assert res.exit_code == 1, res.output
    assert "fits 24 GB" in res.stdout
    assert "of --host-memory's 32.00 GB (28.80 usable); does NOT fit" in res.stdout
    assert "use optimizer.offload.target: disk" in res.stdout
    assert "grass offload/step *" in res.stdout and "no: host" in res.stdout
    res = runner.invoke(app, [*args, "--host-memory", "128", "--json"])
    assert res.exit_code == 0, res.output
    own = [p for p in yaml.safe_load(res.stdout) if p["label"] == "grass offload/step"][0]
    assert own["host_fits"] and own["fits"]
    assert own["host_need"]["pinned store"] == own["host_kinds"]["store_pinned"] > 80e9


def test_the_two_tier_store_fits_an_8b_on_a_24_gb_card_with_32_gb_of_ram(tmp_path):
    """host_budget: auto (the default): the pinned tier takes what the RAM leaves and
    the rest of the 84 GB spills to disk; plan says it fits the card and the RAM, and
    the disk column holds the spill."""
    path = write(tmp_path, recipe(tmp_path))
    args = ["plan", str(path), "--device-memory", "24", "--host-memory", "32", "--json"]
    res = runner.invoke(app, args)
    own = [p for p in yaml.safe_load(res.stdout) if p["label"] == "grass offload/step"][0]
    assert own["fits"] and own["host_fits"], own
    pinned, spill = own["host_kinds"]["store_pinned"], own["disk_bytes"]
    assert sum(own["host_need"].values()) <= 32e9 * 0.9
    assert pinned + spill > 83e9 and 20e9 < pinned < 28.8e9
    budget = recipe(tmp_path, optimizer={"offload": {"residency": "step", "host_budget": 8}})
    res = runner.invoke(app, ["plan", str(write(tmp_path, budget)), *args[2:]])
    own = [p for p in yaml.safe_load(res.stdout) if p["label"] == "grass offload/step"][0]
    assert own["host_kinds"]["store_pinned"] == 8e9 and own["disk_bytes"] > 75e9


def test_the_disk_estimate_is_broken_down_with_the_keys_that_change_it(tmp_path):
    """Checkpoints kept every step of a 14B float32 run do not fit any disk of this
    machine: the message gives each part, and the hint names keep_last (which
    matters with an interval) - without one, at_end (keep_last would change nothing)."""
    free = psutil.disk_usage(str(tmp_path)).free
    rec = recipe(
        tmp_path,
        model={"path": "qwen2.5-14b", "dtype": "float32"},
        checkpoint={"interval": 1, "keep_last": int(free / 200e9) + 2, "at_end": True},
        output={"save_model": True},
        training={"device": "cpu"},
        optimizer={"state_policy": "keep"},
    )
    res = runner.invoke(app, ["validate", str(write(tmp_path, rec))])
    assert res.exit_code == 2, res.output
    assert "final model 59.08, " in res.stderr
    assert "checkpoints at " in res.stderr and "(weights 59.08 + optimizer state" in res.stderr
    assert "hint: lower checkpoint.keep_last" in res.stderr
    # without an interval one checkpoint is written: keep_last changes nothing, at_end does
    rec["checkpoint"] = {"interval": None, "at_end": True}
    if free > 290e9:  # final model 59 + a checkpoint of 59 + 177 GB
        pytest.skip("this disk holds a 14B checkpoint; the keep_last case above stands")
    res = runner.invoke(app, ["validate", str(write(tmp_path, rec))])
    assert res.exit_code == 2, res.output
    assert "1 checkpoint at " in res.stderr and "hint: set checkpoint.at_end: false" in res.stderr


@pytest.mark.skipif(not NO_CUDA, reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_refused_by_train_and_warned_by_validate(tmp_path):
    rec = recipe(tmp_path, model={"path": "embedded:smollm2-135m-instruct"})
    path = write(tmp_path, rec)
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 0, res.output
    assert "warning: training.device is cuda but this machine has no CUDA device" in res.stderr
    res = runner.invoke(app, ["train", str(path)])
    assert res.exit_code == 2
    assert "training.device: training.device is cuda but this machine has no CUDA" in res.stderr
    assert "Traceback" not in res.output and not (tmp_path / "run").exists()


def test_train_refuses_what_the_hosts_ram_cannot_hold(tmp_path):
    """An 8B in float32 on the CPU: weights, gradients and state exceed this machine's
    RAM; train stops before a weight loads (the preset has none to load) and before
    the run folder exists, validate warns."""
    need = 8.03e9 * 4 * 2  # weights + gradients at the least
    if need < psutil.virtual_memory().total * 0.9:
        pytest.skip("this machine has the RAM")
    from grass_cli.presets import get_preset

    folder = tmp_path / "llama-8b-config-only"  # a config, no weights: nothing to load
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(get_preset("llama-3.1-8b", "t").config))
    model = {"path": str(folder), "dtype": "float32"}
    rec = recipe(tmp_path, model=model, training={"device": "cpu"})
    rec["optimizer"] = {"state_policy": "keep"}
    path = write(tmp_path, rec)
    res = runner.invoke(app, ["train", str(path)])
    assert res.exit_code == 2, res.output
    assert "the run needs about" in res.stderr and "GB of host RAM (training peak" in res.stderr
    assert "this machine has" in res.stderr and not (tmp_path / "run").exists()
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 0 and "warning: the run needs about" in res.stderr


def test_settings_that_do_nothing_are_warned_about(tmp_path):
    two = tmp_path / "two.jsonl"
    two.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n')
    rec = {
        "model": {"path": "embedded:smollm2-135m-instruct"},
        "data": {"train": str(two)},
        "training": {
            "max_steps": 500,
            "micro_batch_size": 4,
            "grad_accum_steps": 8,
            "eval_interval": 50,
            "device": "cpu",
        },
        "output": {"dir": str(tmp_path / "run")},
    }
    res = runner.invoke(app, ["validate", str(write(tmp_path, rec))])
    assert res.exit_code == 0, res.output
    assert "warning: training.eval_interval is 50 but data.eval is null" in res.stderr
    assert "warning: 500 steps x a batch of 32 rows go over the 2 training rows 8000 times" in (
        res.stderr
    )
    rec["data"]["train"] = TRAIN
    rec["data"]["eval"] = 0.05
    res = runner.invoke(app, ["validate", str(write(tmp_path, rec))])
    assert "warning" not in res.stderr  # 500 x 32 over 1900 rows: 8 passes, and an eval


def test_a_bad_gguf_is_one_message_whose_hint_fits_the_command(tmp_path):
    """A missing .gguf names the path (not transformers' hub URL message); a corrupt
    one says the config cannot be read, and only `grass plan`, which has the flag,
    suggests --model-config."""
    rec = recipe(tmp_path, model={"path": str(tmp_path / "missing.gguf")})
    res = runner.invoke(app, ["validate", str(write(tmp_path, rec))])
    assert res.exit_code == 2
    assert f"GGUF file not found: {tmp_path / 'missing.gguf'} does not exist" in res.stderr
    assert "huggingface.co" not in res.stderr
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(range(256)) * 8)
    rec["model"]["path"] = str(bad)
    path = write(tmp_path, rec)
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 2 and "cannot read the model's config" in res.stderr
    assert "--model-config" not in res.stderr
    res = runner.invoke(app, ["plan", str(path)])
    assert res.exit_code == 2 and "pass --model-config with a preset" in res.stderr


def test_each_local_process_of_a_torchrun_job_counts(tmp_path, monkeypatch):
    """Under torchrun every process on the machine holds its own store, data and
    runtime: the host need of 2 local processes is twice one's."""
    import re

    rec = recipe(tmp_path, model={"path": "embedded:smollm2-135m-instruct"})
    rec["training"]["device"] = "cpu"
    path = write(tmp_path, rec)

    def need() -> float:
        res = runner.invoke(app, ["validate", str(path)])
        assert res.exit_code == 0, res.output
        return float(re.search(r"about ([\d.]+) GB of host RAM", res.stderr).group(1))

    one = need()
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert need() == pytest.approx(2 * one, rel=0.02)  # (the runtime is measured each time)
