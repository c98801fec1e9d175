"""`sampler.gamma: auto`: the planner picks the most blocks that fit the budget (a
number of GB, LoRA's memory, the device), the same number in plan, validate, the
engine and a resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import ListSink
from typer.testing import CliRunner

from grass_cli.cli import app
from grass_cli.engine import setup, train
from grass_cli.errors import GrassError, RecipeError
from grass_cli.planner.auto import resolve_gamma, with_gamma
from grass_cli.planner.memory import Scenario, plan, recipe_scenario
from grass_cli.planner.shape import build_layout, load_config
from grass_cli.recipe import load_recipe, validate_dict
from grass_cli.telemetry import Telemetry

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "recipes/bench/grass.yaml"
TRAIN = str(ROOT / "data/quickstart/train.jsonl")
runner = CliRunner()


def peak(recipe, lay, gamma: int) -> int:
    r = with_gamma(recipe, gamma)
    return plan(r, lay, recipe_scenario(r), "cpu").device_peak_bytes


@pytest.mark.parametrize("budget", ["lora", "1.5", "3"])
def test_the_most_blocks_that_fit_the_budget(budget):
    """The chosen gamma fits and one more would not (or it is every block)."""
    r = load_recipe(BENCH, ["sampler.gamma=auto", f"sampler.memory_budget={budget}"])
    lay = build_layout(r, *load_config(r))
    limit = (
        plan(r, lay, Scenario("lora", "keep"), "cpu").device_peak_bytes
        if budget == "lora"
        else float(budget) * 1e9
    )
    got = resolve_gamma(r, "cpu", lay=lay)
    g = got.sampler.gamma
    assert isinstance(g, int) and 1 <= g <= len(lay.blocks)
    assert peak(r, lay, g) <= limit
    assert g == len(lay.blocks) or peak(r, lay, g + 1) > limit
    assert got._gamma_auto.startswith(f"auto: the most of {len(lay.blocks)} blocks that fit ")
    if budget == "3":
        assert g == 30  # every block of SmolLM2 fits 3 GB on this recipe
    if budget == "lora":
        assert 1 < g < 30 and "LoRA's" in got._gamma_auto


def test_auto_scales_the_lr_by_the_square_root_of_the_gamma_it_chose():
    """optimizer.lr is the lr for 4 blocks: x sqrt(4 / gamma) for the gamma chosen, said
    in the `why` that plan, validate and the start line print; `fixed` keeps it."""
    args = ["sampler.gamma=auto", "sampler.memory_budget=3", "optimizer.lr=8e-4"]
    got = resolve_gamma(load_recipe(BENCH, args), "cpu")
    assert got.sampler.gamma == 30
    assert got.optimizer.lr == pytest.approx(8e-4 * (4 / 30) ** 0.5)  # 2.92e-4
    assert got._gamma_auto.endswith(
        "; optimizer.lr 0.0008 x sqrt(4/30) = 0.000292 (sampler.auto_lr: sqrt)"
    )
    kept = resolve_gamma(load_recipe(BENCH, [*args, "sampler.auto_lr=fixed"]), "cpu")
    assert kept.sampler.gamma == 30 and kept.optimizer.lr == 8e-4
    assert "optimizer.lr" not in kept._gamma_auto
    # a gamma written as a number keeps its lr whatever auto_lr says
    assert resolve_gamma(load_recipe(BENCH, ["optimizer.lr=8e-4"]), "cpu").optimizer.lr == 8e-4


def test_a_budget_too_small_for_one_block_is_one_message():
    r = load_recipe(BENCH, ["sampler.gamma=auto", "sampler.memory_budget=0.2"])
    with pytest.raises(GrassError) as e:
        resolve_gamma(r, "cpu")
    assert "sampler.gamma is auto, but even one block needs" in str(e.value)
    assert "sampler.memory_budget 0.2 GB" in str(e.value)


def test_numbers_and_other_strategies_are_left_alone():
    r = load_recipe(BENCH)
    assert resolve_gamma(r, "cpu") is r
    lora = load_recipe(BENCH, ["sampler.strategy=lora", "optimizer.state_policy=keep"])
    auto = lora.model_copy(update={"sampler": lora.sampler.model_copy(update={"gamma": "auto"})})
    assert resolve_gamma(auto, "cpu").sampler.gamma == "auto"  # lora draws no blocks


@pytest.mark.parametrize(
    ("sampler", "message"),
    [
        (
            {"gamma": "all"},
            "sampler.gamma: Input should be a number of blocks (at least 1) or auto",
        ),
        (
            {"gamma": True},
            "sampler.gamma: Input should be a number of blocks or auto, not a boolean",
        ),
        ({"gamma": "auto", "memory_budget": 0}, "must be a positive number of GB, device or lora"),
    ],
)
def test_recipe_rules(sampler, message):
    with pytest.raises(RecipeError) as e:
        validate_dict({"data": {"train": TRAIN}, "sampler": sampler}, "r.yaml")
    assert message in str(e.value)


def test_plan_and_validate_say_which_gamma_auto_chose(tmp_path):
    args = [str(BENCH), "sampler.gamma=auto", "sampler.memory_budget=lora"]
    r = load_recipe(BENCH, args[1:])
    want = resolve_gamma(r, "cpu").sampler.gamma
    res = runner.invoke(app, ["plan", *args, "--device", "cpu"])
    assert f"* sampler.gamma {want}: auto: the most of 30 blocks that fit LoRA's" in res.stdout
    res = runner.invoke(app, ["validate", *args, f"output.dir={tmp_path / 'run'}", "--print"])
    assert res.exit_code == 0, res.output
    assert f"sampler.gamma {want}: auto: the most of 30 blocks" in res.stderr
    assert yaml.safe_load(res.stdout)["sampler"]["gamma"] == want


def test_a_budget_without_auto_is_warned_about(tmp_path):
    args = [str(BENCH), "sampler.memory_budget=lora", f"output.dir={tmp_path}/r"]
    res = runner.invoke(app, ["validate", *args])
    assert res.exit_code == 0, res.output
    assert "warning: sampler.memory_budget is lora but sampler.gamma is 4" in res.stderr


def test_validate_for_a_gpu_from_a_machine_without_one_warns(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    args = [str(BENCH), "sampler.gamma=auto", "training.device=cuda", f"output.dir={tmp_path}/r"]
    res = runner.invoke(app, ["validate", *args])
    assert res.exit_code == 0, res.output
    assert "warning: sampler.gamma: auto fills the GPU's memory, which only the training" in (
        res.stderr
    )


def test_the_engine_trains_the_chosen_gamma_and_resumes_with_it(tiny_factory, tmp_path):
    """A tiny Llama (4 blocks) with a budget between 2 and 3 blocks' plans: the run
    draws 2 blocks, records gamma 2 in recipe.yaml and its start event, and a resume
    of the same `auto` recipe continues instead of refusing a changed gamma."""
    folder = tiny_factory("llama", 4)
    base = {
        "model": {"path": str(folder)},
        "data": {"train": TRAIN, "max_length": 64, "limit": 48},
        "sampler": {"strategy": "lisa", "gamma": "auto", "switch_interval": 2},
        "training": {"max_steps": 4, "micro_batch_size": 4, "seed": 0, "device": "cpu"},
        "checkpoint": {"interval": 2},
        "output": {"dir": str(tmp_path / "run"), "save_model": False},
    }
    probe = validate_dict(base, "r.yaml")
    lay = build_layout(probe, *load_config(probe))
    two, three = peak(probe, lay, 2), peak(probe, lay, 3)
    assert two < three
    base["sampler"]["memory_budget"] = (two + three) / 2 / 1e9
    recipe = validate_dict(base, "r.yaml")
    sink = ListSink()
    run = setup(recipe, Telemetry([sink]))
    assert run.recipe.sampler.gamma == 2
    train(run)
    (start,) = sink.of("start")
    assert start["gamma"] == 2 and start["gamma_auto"].startswith("auto: the most of 4 blocks")
    assert all(len(e["active"]) == 2 for e in sink.of("switch"))
    saved = yaml.safe_load((tmp_path / "run/recipe.yaml").read_text())
    assert saved["sampler"]["gamma"] == 2
    base["training"]["max_steps"] = 6
    again = setup(validate_dict(base, "r.yaml"), Telemetry([ListSink()]), resume="auto")
    assert again.recipe.sampler.gamma == 2 and again.resume_from is not None
    train(again)
    steps = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in steps if e["event"] == "step"] == list(range(6))
