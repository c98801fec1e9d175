"""benchmarks/compare.py's bookkeeping: aggregation over seeds, ratios, goal checks."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("compare", ROOT / "benchmarks/compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["compare"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def row(method, task, seed, acc, mem, tps):
    return {
        "method": method, "task": task, "seed": seed, "accuracy": acc, "peak_rss": mem + 2**30,
        "train_peak_rss": mem,
        "cuda_peak": 0, "val_loss": 1.0, "state_bytes_device": 2**20, "trainable_params": 1e6,
        "tokens_per_s": tps, "wall_s": 10.0, "tokens": 100, "lr": 1e-4, "losses": [2.0, 1.0],
    }  # fmt: skip


def test_aggregate_ratios_and_goals(compare):
    rows = [
        # LISA: 40% / 60% on the two tasks, 10 GiB, 100 tok/s
        row("lisa", "family", 0, 0.40, 10 * 2**30, 100.0),
        row("lisa", "reversal", 0, 0.60, 10 * 2**30, 100.0),
        # GRASS: two seeds, 45/55 and 55/65 -> 50 and 60 -> mean 55 (sd 7.07)
        row("grass", "family", 0, 0.45, 7 * 2**30, 95.0),
        row("grass", "reversal", 0, 0.55, 7 * 2**30, 95.0),
        row("grass", "family", 1, 0.55, 9 * 2**30, 85.0),
        row("grass", "reversal", 1, 0.65, 9 * 2**30, 85.0),
    ]
    agg = compare.aggregate(rows, use_cuda=False)
    g = agg["grass"]
    assert g["accuracy"]["family"] == pytest.approx((50.0, 7.0710678))
    assert g["mean_accuracy"] == pytest.approx((55.0, 7.0710678))
    assert g["memory"] == 8 * 2**30 and g["tokens_per_s"] == 90.0
    text = compare.table(agg, use_cuda=False)
    grass_line = next(x for x in text.splitlines() if x.startswith("| GRASS |"))
    cells = [c.strip() for c in grass_line.strip("|").split("|")]
    assert cells[4] == "55.0 ± 7.1"  # mean accuracy
    assert cells[5] == "+5.0"  # vs LISA, points
    assert cells[9] == "0.80"  # memory x LISA
    assert cells[13] == "0.90"  # tokens/s x LISA
    checks = compare.goals(agg)
    assert checks == [
        "- [x] GRASS at least as accurate as LISA: 55.0 vs 50.0",
        "- [x] GRASS peak memory at most 0.80x LISA-keep: 0.80x",
        "- [x] GRASS throughput at least 0.90x LISA: 0.90x",
    ]
    assert g["run_peak_rss"] == 9 * 2**30  # the whole run's peak, kept for the JSON
    rows[2]["peak_rss"] = 40 * 2**30  # the final eval's peak does not count
    rows[2]["train_peak_rss"] = 11 * 2**30  # training's does: GRASS now 0.90x LISA
    assert "- [ ] GRASS peak memory at most 0.80x LISA-keep: 0.90x" in compare.goals(
        compare.aggregate(rows, use_cuda=False)
    )


def test_lr_tuner_picks_validation_minimum_once(compare, tmp_path):
    """Tuning trains each grid lr once (first seed), keeps the lowest validation loss,
    answers the ablations from GRASS's tuning, and honours the mode's tuning task."""
    calls = []

    def fake_train(work, task, method, lr, seed, mode, log):
        calls.append((task, method, lr, seed))
        # validation loss is lowest at 2x the recipe lr for LoRA and GRASS
        best = {"lora": 2e-3}.get(method, 4e-4)
        return {"val_loss": abs(lr - best) + (0.5 if task == "family" else 0.0)}

    mode = compare.MODES["full"]
    assert mode.seeds == (0, 1, 2) and mode.lr_grid == (1.0, 2.0, 4.0)
    tuner = compare.LrTuner(tmp_path, mode, lambda msg: None, train=fake_train)
    assert tuner.lr_for("family", "lora") == pytest.approx(2e-3)
    assert tuner.lr_for("family", "grass") == pytest.approx(4e-4)
    # the full CPU mode tunes on reversal only, with seed 0, three lrs per method
    assert [c for c in calls if c[0] != "reversal" or c[3] != 0] == []
    assert len(calls) == 6
    # ablations take GRASS's lr; nothing new is trained for them or for reversal
    assert tuner.lr_for("reversal", "cyclic") == pytest.approx(4e-4)
    assert tuner.lr_for("family", "grass-static") == pytest.approx(4e-4)
    assert tuner.lr_for("reversal", "lora") == pytest.approx(2e-3)
    assert len(calls) == 6
    assert sorted(tuner.tuning["reversal"]["lora"]) == pytest.approx([1e-3, 2e-3, 4e-3])

    # the GPU mode tunes on each task's own validation split
    calls.clear()
    gpu = compare.LrTuner(tmp_path, compare.MODES["gpu"], lambda msg: None, train=fake_train)
    gpu.lr_for("family", "full")
    gpu.lr_for("reversal", "full")
    assert sorted({c[0] for c in calls}) == ["family", "reversal"] and len(calls) == 6


def test_table_base_model_row(compare):
    rows = [
        row("lisa", "family", 0, 0.40, 10 * 2**30, 100.0),
        row("lisa", "reversal", 0, 0.60, 10 * 2**30, 100.0),
    ]
    agg = compare.aggregate(rows, use_cuda=False)
    text = compare.table(agg, use_cuda=False, base={"family": 0.08, "reversal": 0.12})
    lines = text.splitlines()
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert len(cells) == len(head)
    assert cells[:7] == ["base model (no training)", "0.0", "8.0", "12.0", "10.0", "-40.0", "-"]
    assert set(cells[7:]) == {"-"}
    assert "base model" not in compare.table(agg, use_cuda=False)


def test_tuning_table_marks_choice_and_grid_edge(compare):
    tuning = {"reversal": {"full": {2.5e-5: 0.24, 5e-5: 0.14, 1e-4: 0.07},
                           "lora": {5e-4: 0.20, 1e-3: 0.10, 2e-3: 0.15}}}  # fmt: skip
    lines = compare.tuning_table(tuning).splitlines()
    assert lines[2] == (
        "| reversal | full FT | 2.5e-05: 0.2400, 5.0e-05: 0.1400, **1.0e-04: 0.0700** "
        "| 1.0e-04 (edge of the grid) |"
    )
    assert lines[3].endswith("| 1.0e-03 |") and "**1.0e-03: 0.1000**" in lines[3]
    assert compare.tuning_table({"reversal": {"full": {5e-5: 0.1}}}) == ""  # no grid: no table


def test_runs_are_reused_only_with_the_same_settings(compare, tmp_path, monkeypatch):
    """A finished run is reused when recipe and overrides match; a redone run keeps the
    older held-out score only if its training losses are bitwise the same."""
    children = []
    losses = [2.0, 1.0]

    def fake_child(cmd, **kwargs):
        children.append(cmd)
        out = next(x.split("=", 1)[1] for x in cmd if x.startswith("output.dir="))
        Path(out).mkdir(parents=True, exist_ok=True)  # as the training child does
        line = json.dumps({**row("grass", "reversal", 0, 0.0, 1, 1.0), "losses": list(losses)})
        return compare.subprocess.CompletedProcess(cmd, 0, stdout=line + "\n", stderr="")

    monkeypatch.setattr(compare.subprocess, "run", fake_child)
    quick = compare.MODES["quick"]

    def train(mode):
        return compare.train_one(tmp_path, "reversal", "grass", 2e-4, 0, mode, lambda m: None)

    first = train(quick)
    overrides = children[0][children[0].index("--child") + 2 :]
    assert "training.eval_batch_size=4" in overrides  # validation at the micro-batch
    recipe = compare.ROOT / "recipes/bench/grass.yaml"
    assert first["key"] == compare._key(recipe, overrides)
    assert train(quick) == first and len(children) == 1  # same settings: reused

    out = Path(first["run_dir"])
    score = out / "held_out-100.json"
    score.write_text("{}")
    (out / "held-out-100").mkdir()
    wider = dataclasses.replace(quick, val_limit=60)  # same folder, other settings
    train(wider)
    assert len(children) == 2 and score.exists()  # same losses: the same model, score kept
    losses[1] = 0.999
    train(quick)
    assert len(children) == 3
    assert not score.exists() and not (out / "held-out-100").exists()  # another model


def test_describe_says_whether_lrs_were_tuned(compare):
    full = compare.describe(compare.MODES["full"])
    assert "lr grid x[1.0, 2.0, 4.0] of each recipe's lr (tuned on reversal's" in full
    quick = compare.describe(compare.MODES["quick"])
    assert "each recipe's lr (no tuning)" in quick and "tuned" not in quick.replace("no tuning", "")
    assert "tuned on each task's" in compare.describe(compare.MODES["gpu"])


def test_a_runs_key_is_the_recipe_it_reads_not_the_files_bytes(compare, tmp_path):
    """Editing a comment, or a value an override replaces, keeps a run's key (its cached
    result is still the same training); a value the run reads changes it. A key of the
    older form (the file's bytes hashed) is read as the new one while the file is
    unchanged, and matches nothing after a change."""
    import hashlib

    recipe = tmp_path / "grass.yaml"
    recipe.write_text("sampler:\n  gamma: 4   # of 30\noptimizer:\n  lr: 2.0e-4\n")
    overrides = ["optimizer.lr=0.0008", "output.dir=/runs/a", "output.save_model=true"]
    key = compare._key(recipe, overrides)
    old_form = {"key": {"recipe_sha256": hashlib.sha256(recipe.read_bytes()).hexdigest(),
                        "overrides": overrides}}  # fmt: skip
    assert compare.stored_key(old_form, recipe) == key

    recipe.write_text("# the study's winner\nsampler: {gamma: 4}\noptimizer:\n  lr: 8.0e-4\n")
    assert compare._key(recipe, overrides) == key  # a comment and an overridden lr
    assert compare.stored_key(old_form, recipe) == {}  # the file changed: not vouched for

    elsewhere = ["optimizer.lr=0.0008", "output.dir=/runs/b", "output.save_model=false"]
    moved = compare._key(recipe, elsewhere)
    assert moved["training_sha256"] == key["training_sha256"]  # same training, elsewhere
    assert moved["effective_sha256"] != key["effective_sha256"]

    recipe.write_text("sampler: {gamma: 8}\noptimizer:\n  lr: 8.0e-4\n")
    changed = compare._key(recipe, overrides)
    assert changed["training_sha256"] != key["training_sha256"]  # gamma is read
