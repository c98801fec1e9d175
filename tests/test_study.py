"""benchmarks/study.py's screen, with the training replaced by a known loss surface:
the lr grid is extended until its best value is interior, every axis is tried
around the chosen lr, and the results are saved after every run."""

from __future__ import annotations

import argparse
import importlib.util
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_study():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("study", ROOT / "benchmarks/study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_screen_extends_the_lr_grid_until_interior_and_saves_every_run(monkeypatch, tmp_path):
    study = load_study()
    trained: list[tuple[float, tuple[str, ...]]] = []

    def fake_train_one(work, task, method, lr, seed, mode, log):
        trained.append((lr, tuple(mode.overrides)))
        # validation loss: a bowl in log(lr) with its bottom at 8e-4; gamma 8 helps
        loss = 0.02 + (math.log2(lr / 8e-4)) ** 2 * 1e-3
        if "sampler.gamma=8" in mode.overrides:
            loss -= 5e-3
        return {"val_loss": loss, "tokens_per_s": 100.0, "train_peak_rss": 2**30, "train_s": 1.0}

    monkeypatch.setattr(study.compare, "train_one", fake_train_one)
    args = argparse.Namespace(
        axes=["lr", "gamma"], steps=10, batch=2, val_limit=5, lr=1e-4, work=tmp_path
    )
    saved: list[int] = []
    res = study.screen(args, lambda msg: None, lambda r: saved.append(len(r["axes"])))

    lrs = [r["lr"] for r in res["axes"]["lr"]]
    assert [round(x, 8) for x in lrs] == [5e-5, 1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3]
    assert res["lr"] == 8e-4  # interior: 1.6e-3 is worse
    gamma = {r["value"]: r["val_loss"] for r in res["axes"]["gamma"]}
    assert set(gamma) == {2, 4, 8} and min(gamma, key=gamma.get) == 8
    # the gamma runs were made at the chosen lr, with only their own override added
    assert {o for lr, o in trained if o != ("output.save_model=false",)} == {
        ("output.save_model=false", "sampler.gamma=2"),
        ("output.save_model=false", "sampler.gamma=8"),
    }
    assert all(lr == 8e-4 for lr, o in trained if len(o) > 1)
    assert len(saved) == 1 + 2  # after the base run, then after each gamma run
    text = study.render(res, "python benchmarks/study.py screen")
    assert "| gamma | 8 | **0.0150** |" in text


def test_an_axis_the_bench_recipe_leaves_at_its_default():
    """sampler.lr_correction is not in recipes/bench/grass.yaml: its base value is the
    recipe default."""
    study = load_study()
    recipe = study.compare._recipe("grass")
    assert "lr_correction" not in recipe["sampler"]
    assert study._base_value(recipe, "sampler.lr_correction") == "none"
    assert study._base_value(recipe, "sampler.gamma") == recipe["sampler"]["gamma"]


def test_seeds_give_each_variant_its_mean_and_spread_and_combo_joins_overrides(
    monkeypatch, tmp_path
):
    study = load_study()
    trained: list[tuple[int, tuple[str, ...]]] = []

    def fake_train_one(work, task, method, lr, seed, mode, log):
        trained.append((seed, tuple(mode.overrides)))
        loss = 0.02 + 1e-3 * seed  # seeds 0, 1, 2: mean 0.021, sd 0.001
        if "sampler.gamma=8" in mode.overrides:
            loss -= 5e-3
        if "sampler.lr_correction=inverse_probability" in mode.overrides:
            loss -= 1e-3
        return {"val_loss": loss, "tokens_per_s": 100.0, "train_peak_rss": 2**30, "train_s": 1.0}

    monkeypatch.setattr(study.compare, "train_one", fake_train_one)
    args = argparse.Namespace(
        axes=["combo"], steps=10, batch=2, val_limit=5, lr=8e-4, work=tmp_path, seeds=[0, 1, 2]
    )
    res = study.screen(args, lambda msg: None)

    assert res["base"]["val_losses"] == [0.02, 0.021, 0.022]
    assert math.isclose(res["base"]["val_loss"], 0.021)
    assert math.isclose(res["base"]["val_loss_sd"], 0.001)
    base, combo = res["axes"]["combo"]
    assert base["value"] == "base"
    assert combo["value"] == "gamma 8 + lr_correction inverse_probability"
    assert math.isclose(combo["val_loss"], 0.015)
    # every seed of the combo ran with both overrides at once
    both = ("sampler.gamma=8", "sampler.lr_correction=inverse_probability")
    assert sorted(s for s, o in trained if o[1:] == both) == [0, 1, 2]
    assert len(trained) == 6
    text = study.render(res, "python benchmarks/study.py screen --seeds 0 1 2")
    assert "| combo | gamma 8 + lr_correction inverse_probability | **0.0150 ± 0.0010** |" in text
    assert "0.0140, 0.0150, 0.0160 |" in text
