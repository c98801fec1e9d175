"""The training engine end to end on tiny random models (and SmolLM2, marked slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import ListSink
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from grass_cli.cli import app
from grass_cli.engine import setup, train
from grass_cli.recipe import validate_dict
from grass_cli.telemetry import Telemetry

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "data/quickstart/train.jsonl")
EVAL = str(ROOT / "data/quickstart/eval.jsonl")


def recipe_for(model_dir: Path, out: Path, **sections) -> object:
    data = {
        "model": {"path": str(model_dir)},
        "data": {"train": TRAIN, "eval": EVAL, "max_length": 64, "limit": 48, "eval_limit": 16},
        "sampler": {
            "strategy": "grass",
            "gamma": 2,
            "switch_interval": 2,
            "probe_steps": 2,
            "update_interval": 2,
        },
        "optimizer": {"lr": 1e-3},
        "training": {"max_steps": 6, "micro_batch_size": 4, "seed": 0},
        "output": {"dir": str(out)},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return validate_dict(data, "test.yaml")


def run(recipe) -> tuple[object, ListSink, object]:
    sink = ListSink()
    r = setup(recipe, Telemetry([sink]), overwrite=True)
    result = train(r)
    return r, sink, result


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("strategy", ["lisa", "grass", "grass-static", "cyclic"])
def test_frozen_blocks_are_bit_identical(strategy, tiny_factory, tmp_path):
    model_dir = tiny_factory("llama", 4)
    before = snapshot(AutoModelForCausalLM.from_pretrained(model_dir))
    # One switch interval covering the run: the first active set is the only one.
    rec = recipe_for(
        model_dir,
        tmp_path / "run",
        sampler={"strategy": strategy, "gamma": 1, "switch_interval": 100},
        optimizer={"weight_decay": 0.1},
    )
    r, sink, _ = run(rec)
    active = set(sink.of("switch")[0]["active"])
    assert len(sink.of("switch")) == 1
    after = snapshot(r.model)
    for name, p in after.items():
        i = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        if name.startswith("model.embed_tokens") or (i is not None and i not in active):
            assert torch.equal(p, before[name]), f"{name} changed while frozen"
        elif i is not None and i in active and p.ndim >= 2:
            assert not torch.equal(p, before[name]), f"{name} did not train"
    assert not torch.equal(after["model.norm.weight"], before["model.norm.weight"])


def test_same_seed_same_loss_curve(tiny_factory, tmp_path):
    model_dir = tiny_factory("llama", 4)
    _, _, a = run(recipe_for(model_dir, tmp_path / "a"))
    _, _, b = run(recipe_for(model_dir, tmp_path / "b"))
    assert a.losses == b.losses and len(a.losses) == 6
    assert a.eval_losses == b.eval_losses
    _, _, c = run(recipe_for(model_dir, tmp_path / "c", training={"seed": 1}))
    assert c.losses != a.losses


def test_saved_model_reloads_with_identical_logits(tiny_factory, tmp_path):
    r, _, result = run(recipe_for(tiny_factory("llama", 4), tmp_path / "run"))
    assert result.model_dir == tmp_path / "run" / "final"
    reloaded = AutoModelForCausalLM.from_pretrained(result.model_dir)
    ids = torch.tensor([[1, 400, 500, 600, 700, 2]])
    r.model.eval()
    with torch.no_grad():
        assert torch.equal(r.model(ids).logits, reloaded(ids).logits)
    assert (result.model_dir / "tokenizer.json").exists()
    assert (result.model_dir / "model.safetensors").exists()


def test_grad_accumulation_matches_one_big_batch(tiny_factory, tmp_path):
    model_dir = tiny_factory("llama", 4)
    common = dict(sampler={"strategy": "full"}, optimizer={"lr": 1e-3}, data={"limit": 8})
    _, _, big = run(
        recipe_for(
            model_dir,
            tmp_path / "big",
            training={"max_steps": 3, "micro_batch_size": 8, "grad_accum_steps": 1},
            **common,
        )
    )
    r, _, acc = run(
        recipe_for(
            model_dir,
            tmp_path / "acc",
            training={"max_steps": 3, "micro_batch_size": 2, "grad_accum_steps": 4},
            **common,
        )
    )
    # Same rows per step, token-weighted loss: equal up to float summation order.
    assert acc.losses == pytest.approx(big.losses, rel=1e-5)


def test_keep_and_drop_state_policies(tiny_factory, tmp_path):
    model_dir = tiny_factory("llama", 4)
    for policy in ("keep", "drop"):
        rec = recipe_for(
            model_dir,
            tmp_path / policy,
            sampler={"strategy": "cyclic", "gamma": 2, "switch_interval": 1},
            optimizer={"state_policy": policy},
            training={"max_steps": 3},
        )
        r, sink, _ = run(rec)
        # cyclic gamma 2 over 4 blocks: steps use {0,1}, {2,3}, {0,1}
        assert [e["active"] for e in sink.of("switch")] == [[0, 1], [2, 3], [0, 1]]
        opt0 = r.optimizer.states["block.0"].optimizer
        steps = {int(s["step"]) for s in opt0.state.values()}
        frozen = r.optimizer.states["block.2"].optimizer.state
        if policy == "keep":
            assert steps == {2}  # block 0 stepped at steps 0 and 2: moments kept
            assert len(frozen) > 0
        else:
            assert steps == {1}  # dropped at the switch, restarted at step 2
            assert len(frozen) == 0


def test_telemetry_and_files(tiny_factory, tmp_path):
    r, sink, result = run(recipe_for(tiny_factory("llama", 4), tmp_path / "run"))
    steps = sink.of("step")
    assert [e["step"] for e in steps] == list(range(6))
    for e in steps:
        assert len(e["importance"]) == 4 and len(e["probabilities"]) == 4
        assert sum(e["probabilities"]) == pytest.approx(1.0)
        assert e["rss"] > 0 and e["tokens"] > 0 and e["lr"] > 0
    assert len(sink.of("probe")) == 2 and len(sink.of("probe_done")) == 1
    lines = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in lines if x["event"] == "step"] == result.losses
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["steps"] == 6 and summary["final_eval_loss"] == result.eval_losses[6]
    resolved = (tmp_path / "run/recipe.yaml").read_text()
    assert "strategy: grass" in resolved


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "gpt_neox", "gemma", "mistral"])
def test_trains_other_architectures(arch, tiny_factory, tmp_path):
    _, sink, result = run(
        recipe_for(
            tiny_factory(arch, 3), tmp_path / arch, training={"max_steps": 2}, data={"limit": 8}
        )
    )
    assert len(result.losses) == 2 and all(x == x for x in result.losses)


runner = CliRunner()


def test_cli_train_and_refuse_existing_run(tiny_factory, tmp_path):
    rec = tmp_path / "r.yaml"
    rec.write_text(recipe_for(tiny_factory("llama", 4), tmp_path / "run").to_yaml())
    res = runner.invoke(app, ["train", str(rec), "training.max_steps=2", "--no-live"])
    assert res.exit_code == 0, res.output
    assert "step     2/2" in res.stdout and "done   steps=2" in res.stdout
    assert "max_steps: 2" in (tmp_path / "run/recipe.yaml").read_text()
    res = runner.invoke(app, ["train", str(rec), "training.max_steps=2"])
    assert res.exit_code == 2
    assert "the run dir already holds a run" in res.stderr and "--overwrite" in res.stderr
    res = runner.invoke(app, ["train", str(rec), "sampler.gamma=9", "--overwrite"])
    assert res.exit_code == 2
    assert "sampler.gamma is 9 but the model has only 4 blocks" in res.stderr


@pytest.mark.slow
def test_quickstart_lowers_eval_loss_on_smollm2(tmp_path):
    from grass_cli.recipe import load_recipe

    rec = load_recipe(
        ROOT / "recipes/quickstart.yaml",
        [
            f"output.dir={tmp_path / 'qs'}",
            "training.max_steps=12",
            "data.eval_limit=40",
            f"data.train={TRAIN}",
            f"data.eval={EVAL}",
        ],
    )
    _, sink, result = run(rec)
    first, last = result.eval_losses[0], result.eval_losses[12]
    assert last < first - 0.3, (first, last)
    assert len(sink.of("probe")) == 4


def test_recipe_eval_section_runs_at_interval_and_end(tiny_factory, tmp_path):
    rec = recipe_for(tiny_factory("llama", 4), tmp_path / "run")
    rec = validate_dict(
        {
            **rec.model_dump(mode="json"),
            "eval": {
                "kind": ["generate"],
                "scorer": "numeric",
                "limit": 3,
                "max_new_tokens": 3,
                "interval": 3,
            },
        },
        "test.yaml",
    )
    _, sink, result = run(rec)
    evals = sink.of("task_eval")
    assert [e["step"] for e in evals] == [3, 6]
    for e in evals:
        assert 0.0 <= e["accuracy"] <= 1.0 and e["scored"] == 3
        preds = (Path(e["dir"]) / "predictions.jsonl").read_text().splitlines()
        assert len(preds) == 3
    assert result.task_eval["step"] == 6


def test_recipe_eval_missing_file_fails_before_training(tiny_factory, tmp_path):
    from grass_cli.errors import GrassError

    rec = recipe_for(tiny_factory("llama", 4), tmp_path / "run")
    rec = validate_dict(
        {**rec.model_dump(mode="json"), "eval": {"data": str(tmp_path / "nope.jsonl")}}, "test.yaml"
    )
    with pytest.raises(GrassError, match=r"eval\.data: .*nope\.jsonl: data file not found") as e:
        setup(rec, Telemetry([]), overwrite=True)
    assert "check the path in eval.data" in e.value.hint
    assert not (tmp_path / "run").exists()
