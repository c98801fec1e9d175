"""benchmarks/suite.py, with the training replaced by known results: one lr per method
from the tuning tasks' validation losses, equal wall-clock steps from the measured
seconds, extra seeds only where a goal's two methods are close, the tables, and the
reasoning-gym verifier that scores propositional_logic."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "scripts"))
    spec = importlib.util.spec_from_file_location(name, ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def suite(monkeypatch, tmp_path):
    s = load("benchmarks/suite")
    monkeypatch.setattr(s, "DATA", tmp_path / "data")
    monkeypatch.setattr(s, "max_length", lambda task: 128)
    # register() fills compare.TASKS, one dict for every test (test_study's too): a copy
    monkeypatch.setattr(s.compare, "TASKS", dict(s.compare.TASKS))
    s.register(list(s.TASKS))
    return s


def fake_run(tmp_path: Path, gamma: int = 4, train_rows: int = 3) -> Path:
    """A run folder whose metrics.jsonl starts as the engine's does."""
    run = Path(tempfile.mkdtemp(dir=tmp_path))
    start = {"event": "start", "gamma": gamma, "train_rows": train_rows}
    (run / "metrics.jsonl").write_text(json.dumps(start) + "\n")
    return run


def write_task(suite, task: str, rows: int = 3) -> None:
    d = suite.DATA / task
    d.mkdir(parents=True, exist_ok=True)
    row = json.dumps({"prompt": "q", "completion": "a"}) + "\n"
    (d / "train.jsonl").write_text(row * rows)


def test_tune_keeps_the_lr_with_the_best_geometric_mean_over_the_tuning_tasks(
    suite, tmp_path, monkeypatch
):
    trained: list[tuple[str, str, float]] = []
    # reversal prefers 2e-3, family 1e-3 with a much larger loss scale: the geometric
    # mean weighs both tasks' relative changes, so the middle value wins
    surface = {
        "reversal": {1e-3: 0.020, 2e-3: 0.010, 4e-3: 0.060},
        "family": {1e-3: 0.300, 2e-3: 0.320, 4e-3: 0.900},
    }

    def fake_train_one(work, task, method, lr, seed, mode, log):
        trained.append((task, method, lr))
        assert seed == 0 and mode.steps == suite.TUNE_STEPS
        return {"val_loss": surface[task][lr]}

    # (monkeypatch: compare is one module for every test, test_study's too)
    monkeypatch.setattr(suite.compare, "train_one", fake_train_one)
    lrs = suite.tune(tmp_path / "work", ["lora"], tmp_path)
    assert lrs == {"lora": 2e-3}
    # the middle of the grid first, on both tuning tasks: what the suite needs most
    assert trained[:2] == [("reversal", "lora", 2e-3), ("family", "lora", 2e-3)]
    assert len(trained) == 6
    saved = json.loads((tmp_path / "suite-lr.json").read_text())
    assert saved["chosen"] == {"lora": 2e-3}
    assert saved["losses"]["lora"]["0.004"] == {"reversal": 0.060, "family": 0.900}
    md = (tmp_path / "suite-lr.md").read_text()
    gm = math.sqrt(0.010 * 0.320)
    assert f"| lora | 2.0e-03 | 0.0100 | 0.3200 | {gm:.4f} | **yes** |" in md


def test_tune_grows_the_grid_past_an_edge_that_holds_the_best_lr(suite, tmp_path, monkeypatch):
    """LoRA's best lr at the grid's low edge (1e-3): tuning tries 5e-4, then 2.5e-4,
    and keeps 5e-4, the best inside the grown grid; a method whose loss keeps falling
    stops after EXTEND extra values and says the best is still at the edge. The
    results folder is made when missing."""
    trained: list[float] = []
    surface = {1e-3: 0.010, 2e-3: 0.020, 4e-3: 0.40, 5e-4: 0.008, 2.5e-4: 0.009}

    def fake_train_one(work, task, method, lr, seed, mode, log):
        trained.append(lr)
        return {"val_loss": surface[lr] if method == "lora" else lr}

    # (monkeypatch: compare is one module for every test, test_study's too)
    monkeypatch.setattr(suite.compare, "train_one", fake_train_one)
    results = tmp_path / "results"  # (not there yet)
    assert suite.tune(tmp_path / "work", ["lora"], results) == {"lora": 5e-4}
    assert trained == [x for x in (2e-3, 1e-3, 4e-3, 5e-4, 2.5e-4) for _ in suite.TUNE_TASKS]
    trained.clear()
    # full's loss falls with the lr all the way down: 2 extra values, then it stops
    assert suite.tune(tmp_path / "work", ["full"], results) == {"full": 2.5e-5}
    assert sorted(set(trained)) == [2.5e-5, 5e-5, 1e-4, 2e-4, 4e-4]
    saved = json.loads((results / "suite-lr.json").read_text())
    assert saved["chosen"] == {"lora": 5e-4, "full": 2.5e-5}


def test_run_trains_every_cell_adds_equal_wall_clock_and_seeds_only_where_close(
    suite, tmp_path, monkeypatch
):
    for t in ("gcd", "count_bits"):
        write_task(suite, t)
    (tmp_path / "suite-lr.json").write_text(
        json.dumps({"chosen": {"lora": 2e-3, "grass": 8e-4}, "losses": {}})
    )
    # accuracy by (task, method): grass within 3 points of LoRA on gcd only
    accuracy = {("gcd", "lora"): 0.40, ("gcd", "grass"): 0.42, ("count_bits", "lora"): 0.50,
                ("count_bits", "grass"): 0.30}  # fmt: skip
    seconds_per_step = {"lora": 2.0, "grass": 1.6}
    trained: list[tuple[str, str, int, int]] = []

    def fake_train_one(work, task, method, lr, seed, mode, log):
        trained.append((task, method, seed, mode.steps))
        run = fake_run(tmp_path)
        return {
            "val_loss": 0.5, "train_peak_rss": 2**30 * (2 if method == "lora" else 1.5),
            "train_s": seconds_per_step[method] * mode.steps, "wall_s": 1.0,
            "tokens_per_s": 1.0, "run_dir": str(run), "method": method, "task": task,
        }  # fmt: skip

    def fake_held_out(result, mode, log):
        return {"accuracy": accuracy[result["task"], result["method"]]}

    monkeypatch.setattr(suite.compare, "train_one", fake_train_one)
    monkeypatch.setattr(suite.compare, "held_out", fake_held_out)
    rows = suite.run(tmp_path / "w", 1000, ["gcd", "count_bits"], ["lora", "grass"], True, tmp_path)
    # equal wall-clock: LoRA's 2000 s at GRASS's 1.6 s a step
    assert ("gcd", "grass", 0, 1250) in trained
    # gcd's grass and LoRA are 2 points apart: two more seeds each; count_bits's are not
    seeds = sorted(x for x in trained if x[2] > 0)
    assert seeds == [("gcd", "grass", 1, 1000), ("gcd", "grass", 2, 1000),
                     ("gcd", "lora", 1, 1000), ("gcd", "lora", 2, 1000)]  # fmt: skip
    assert not any(t == "count_bits" and s > 0 for t, _, s, _ in trained)
    assert {(r["task"], r["method"], r["seed"]) for r in rows} >= {("gcd", "grass-wall", 0)}
    saved = json.loads((tmp_path / "suite-1000.json").read_text())
    assert len(saved["rows"]) == len(rows) == 2 * 3 + 4
    md = (tmp_path / "suite-1000.md").read_text()
    assert "| gcd | number theory | 40.0 ± 0.0 | 42.0 ± 0.0 | 42.0 |" in md
    # mean over both tasks: LoRA (40 + 50) / 2, GRASS (42 + 30) / 2
    assert "| **mean** (2 tasks) | | **45.0** | **36.0** | **36.0** |" in md
    # the costs: GRASS's peak 0.75x LoRA's, 0.8x its seconds
    assert "| GRASS (gamma 4) | 1.50 | 0.75 | 1600 | 0.80 | 0.500 | 4 | 1000 |" in md


def test_a_run_that_dropped_rows_for_length_stops_the_suite(suite, tmp_path, monkeypatch):
    write_task(suite, "gcd", rows=5)
    run = fake_run(tmp_path, train_rows=4)
    with pytest.raises(SystemExit, match="1 rows longer than max_length 128"):
        suite.check_rows("gcd", run, 128)


def test_propositional_logic_is_scored_by_reasoning_gyms_verifier(suite, tmp_path):
    make_data = load("scripts/make_data")
    task, config = make_data.SUITE["propositional_logic"]
    make_data.write_splits(suite.DATA / "propositional_logic", {"test": 6}, task, config, fill=True)
    rows = [json.loads(x) for x in (suite.DATA / "propositional_logic/test.jsonl").open()]
    held = tmp_path / "held"
    held.mkdir()
    # the example conclusion (right), a premise's negation and an empty answer (wrong)
    preds = [rows[0]["answer"], rows[1]["answer"], rows[2]["answer"], "¬(P ∨ ¬P)", "", "x"]
    (held / "predictions.jsonl").write_text(
        "".join(json.dumps({"index": i, "prediction": p}) + "\n" for i, p in enumerate(preds))
    )
    assert suite.verified_accuracy("propositional_logic", held) == pytest.approx(3 / 6)
    # a test row that its seed and index do not make is refused, not scored
    rows[1]["prompt"] = "changed"
    text = "".join(json.dumps(r) + "\n" for r in rows)
    (suite.DATA / "propositional_logic/test.jsonl").write_text(text)
    with pytest.raises(SystemExit, match="test row 1 is not the item"):
        suite.verified_accuracy("propositional_logic", held)


def test_close_pairs_and_wall_steps(suite):
    rows = [
        {"task": "gcd", "method": "grass-auto", "seed": 0, "accuracy": 0.50},
        {"task": "gcd", "method": "lora", "seed": 0, "accuracy": 0.52},
        {"task": "gcd", "method": "lisa", "seed": 0, "accuracy": 0.10},
        {"task": "gcd", "method": "grass", "seed": 0, "accuracy": 0.30},
    ]
    assert suite.close_pairs(rows, "gcd") == {"grass-auto", "lora"}
    assert suite.wall_steps({"train_s": 700.0}, {"train_s": 500.0, "steps": 1000}) == 1400


def test_block_moves_is_each_blocks_relative_distance_from_the_base(suite, tmp_path):
    import torch
    from safetensors.torch import save_file

    base, run = tmp_path / "base", tmp_path / "run"
    (run / "final").mkdir(parents=True)
    base.mkdir()
    w0 = {
        "model.layers.0.mlp.up_proj.weight": torch.full((2, 2), 2.0),
        "model.layers.0.input_layernorm.weight": torch.ones(4),
        "model.layers.1.mlp.up_proj.weight": torch.ones(2, 2),
        "model.embed_tokens.weight": torch.ones(3, 2),
    }
    save_file(w0, base / "model.safetensors")
    w = dict(w0)
    w["model.layers.0.mlp.up_proj.weight"] = torch.full((2, 2), 3.0)  # +1 on 4 values
    save_file(w, run / "final" / "model.safetensors")
    moves = suite.block_moves(run, base)
    # block 0: sqrt(4 * 1) / sqrt(4 * 4 + 4 * 1); untouched ones 0
    assert moves == pytest.approx({"block.0": (4 / 20) ** 0.5, "block.1": 0.0, "embed": 0.0})
    # kept: read back once the model is gone
    import shutil

    shutil.rmtree(run / "final")
    assert suite.block_moves(run, base) == moves
    assert suite.block_moves(tmp_path / "other", base) is None
    # a run trained again (another key in result.json) is measured again, not read back
    (run / "result.json").write_text(json.dumps({"key": {"training_sha256": "b"}}))
    assert suite.block_moves(run, base) is None
    (run / "final").mkdir()
    w["model.layers.1.mlp.up_proj.weight"] = torch.full((2, 2), 2.0)  # +1 on 4 values
    save_file(w, run / "final" / "model.safetensors")
    assert suite.block_moves(run, base)["block.1"] == pytest.approx(1.0)


def test_diagnose_counts_steps_per_block_compares_moves_and_ranks(suite, tmp_path):
    grass = tmp_path / "grass"
    grass.mkdir()
    steps = [
        {"event": "step", "active": [0, 1], "importance": [0.1, 0.2, 0.3, 0.4]},
        {"event": "step", "active": [0, 2], "importance": [0.1, 0.2, 0.3, 0.4]},
        {"event": "switch", "active": [3]},
        {"event": "step", "active": [0, 3], "importance": [0.4, 0.3, 0.2, 0.1]},
    ]
    (grass / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in steps))
    assert suite.steps_trained(grass) == ([3, 1, 1, 1], [0.4, 0.3, 0.2, 0.1])
    moves = {f"block.{i}": v for i, v in enumerate([0.04, 0.03, 0.02, 0.01])}
    rows = [
        {"task": "gcd", "method": "grass", "seed": 0, "steps": 3, "run_dir": str(grass),
         "moves": {k: v / 2 for k, v in moves.items()}},
        {"task": "gcd", "method": "lora", "seed": 0, "steps": 3, "run_dir": "-", "moves": moves},
    ]  # fmt: skip
    d = suite.diagnose(rows)["gcd"]
    assert d["grass_share_min"] == pytest.approx(1 / 3) and d["grass_share_max"] == 1.0
    assert d["move_lora"] == pytest.approx(0.025)
    assert d["move_grass_over_lora"] == pytest.approx(0.5)
    # GRASS's last importance orders the blocks as LoRA's moves do
    assert d["mgn_vs_lora_spearman"] == pytest.approx(1.0)
    assert suite.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    md = suite.diagnose_table(300, {"gcd": d})
    assert "| gcd | 0.333 | 1.000 |" in md and "| +1.00 |" in md


def test_plan_reports_tuning_and_counts_cells_at_the_chosen_lr_only(suite, tmp_path):
    """`plan`: each method's tuning (its lr, or the lrs trained on every tuning task),
    and a budget's cells done only at the method's chosen lr: LoRA's tuning run at 2e-3
    on reversal is not the suite's reversal cell when 1e-3 was chosen."""
    work, results = tmp_path / "work", tmp_path / "results"
    results.mkdir()
    (results / "suite-lr.json").write_text(json.dumps({"chosen": {"lora": 1e-3}, "losses": {}}))

    def done(task: str, method: str, lr: float) -> None:
        run = suite.compare.run_dir_for(work, task, method, lr, 0, suite.mode(task, 300, 0))
        run.mkdir(parents=True)
        (run / "result.json").write_text(json.dumps({"wall_s": 600.0}))

    for lr in (1e-3, 2e-3):
        for task in suite.TUNE_TASKS:
            done(task, "lora", lr)
    done("reversal", "grass", 8e-4)  # one tuning task only: not a trained lr yet
    out = suite.plan(work, 300, list(suite.TASKS), ["lora", "grass"], results)
    assert "tuning lora: lr 0.001 (2 lrs trained: 1.00e-03, 2.00e-03)" in out
    assert "tuning grass: not tuned yet (0 lrs trained: )" in out
    # LoRA's reversal and family cells at 1e-3; 22 others to go, at 600 s a run
    assert "300 steps: 2 cells done, 22 to go (seed 0), about 3.7 h at 600 s a run" in out
