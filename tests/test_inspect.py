"""`grass inspect-importance`: probing profiles on tiny models, the JSON against the
table, the same MGN as training's probing phase, and a run's history."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from helpers import ListSink
from scipy.stats import spearmanr
from typer.testing import CliRunner

from grass_cli.cli import app
from grass_cli.commands.inspect import bar, format_mgn, history_table, profile_table, ranks
from grass_cli.engine import probe_phase, setup
from grass_cli.recipe import validate_dict
from grass_cli.telemetry import Telemetry

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "data/quickstart/train.jsonl")
GSM8K = str(ROOT / "data/gsm8k/test-50.jsonl")
PNG = b"\x89PNG\r\n\x1a\n"

runner = CliRunner()


def cells(table, column: int) -> list[str]:
    return [str(c) for c in table.columns[column]._cells]


@pytest.fixture(scope="module")
def compared(tiny_factory, tmp_path_factory):
    """One CLI run comparing chain-sum arithmetic with GSM8K word problems."""
    out = tmp_path_factory.mktemp("inspect")
    res = runner.invoke(
        app,
        [
            "inspect-importance",
            str(tiny_factory("llama", 4)),
            "--data",
            TRAIN,
            "--compare",
            GSM8K,
            "--batches",
            "2",
            "--batch-size",
            "4",
            "--out",
            str(out),
        ],  # fmt: skip
    )
    assert res.exit_code == 0, res.output
    return res, json.loads((out / "importance.json").read_text()), out


def test_two_datasets_give_different_profiles(compared):
    _, result, out = compared
    a, b = result["mgn"], result["compare"]["mgn"]
    assert len(a) == len(b) == 4
    assert all(v > 0 and math.isfinite(v) for v in a + b)
    assert max(abs(x - y) / x for x, y in zip(a, b, strict=True)) > 0.05
    assert result["data"] == TRAIN and result["compare"]["data"] == GSM8K
    rho, p = spearmanr(a, b)
    assert result["spearman"] == pytest.approx({"rho": rho, "p": p})
    assert (out / "importance.png").read_bytes()[:8] == PNG


def test_json_matches_the_table(compared):
    res, result, _ = compared
    table = profile_table(result)
    assert cells(table, 0) == ["0", "1", "2", "3"]
    assert cells(table, 1) == [format_mgn(v) for v in result["mgn"]]
    assert cells(table, 2) == [str(r) for r in result["rank"]]
    assert cells(table, 4) == [format_mgn(v) for v in result["compare"]["mgn"]]
    assert cells(table, 5) == [str(r) for r in result["compare"]["rank"]]
    # The printed table holds the same numbers, one block per line.
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    for i, (va, vb) in enumerate(zip(result["mgn"], result["compare"]["mgn"], strict=True)):
        row = next(ln for ln in lines if ln.split("│")[1:2] and ln.split("│")[1].strip() == str(i))
        assert format_mgn(va) in row and format_mgn(vb) in row
    assert f"{result['spearman']['rho']:.3f}" in res.stdout
    # Ranks and ranking agree with the values.
    order = sorted(range(4), key=lambda i: -result["mgn"][i])
    assert result["ranking"] == order
    assert [result["rank"][i] for i in order] == [1, 2, 3, 4]


def test_json_flag_prints_importance_json(tiny_factory, tmp_path):
    res = runner.invoke(
        app,
        [
            "inspect-importance",
            str(tiny_factory("llama", 2)),
            "--data",
            TRAIN,
            "--batches",
            "1",
            "--batch-size",
            "2",
            "--json",
            "--out",
            str(tmp_path),
        ],  # fmt: skip
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == json.loads((tmp_path / "importance.json").read_text())


def _mixture(tmp_path: Path, **extra) -> dict:
    """TRAIN and a datasets folder of other rows, weighted, 4 rows held out."""
    from datasets import Dataset

    rows = [{"prompt": f"What is {i} times 3?", "completion": str(3 * i)} for i in range(40)]
    Dataset.from_list(rows).save_to_disk(str(tmp_path / "folder"))
    train = [{"path": TRAIN, "weight": 2}, {"path": str(tmp_path / "folder"), "weight": 1}]
    return {"train": train, "max_length": 64, "limit": 30, "eval": 4, **extra}


@pytest.mark.parametrize("kind", ["file", "mixture", "stream"])
def test_recipe_mode_measures_what_training_probes(kind, tiny_factory, tmp_path):
    """Same recipe, same batches: the command's MGN is the training probe's MGN,
    whatever the recipe's data is (one file; a mixture with a saved folder and rows
    held out; the same mixture streamed)."""
    data_section = {
        "file": lambda: {"train": TRAIN, "max_length": 64, "limit": 32},
        "mixture": lambda: _mixture(tmp_path),
        "stream": lambda: _mixture(tmp_path, streaming=True, shuffle_block=16),
    }[kind]()
    data = {
        "model": {"path": str(tiny_factory("llama", 4))},
        "data": data_section,
        "sampler": {"strategy": "grass", "gamma": 2, "probe_steps": 3},
        "training": {"max_steps": 1, "micro_batch_size": 4, "seed": 7},
        "output": {"dir": str(tmp_path / "run")},
    }
    sink = ListSink()
    run = setup(validate_dict(data, "r.yaml"), Telemetry([sink]), overwrite=True)
    probe_phase(run)
    trained = next(e for e in sink.events if e["event"] == "probe_done")["importance"]

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump(data))
    res = runner.invoke(
        app, ["inspect-importance", str(recipe), "--batches", "3", "--json", "--out", str(tmp_path)]
    )
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["batch_size"] == 4 and result["seed"] == 7
    assert result["mgn"] == pytest.approx(trained, rel=1e-9)
    if kind != "file":
        assert result["data"] == f"{TRAIN} + {tmp_path / 'folder'}"


def test_probing_leaves_the_model_untouched(tiny_factory, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from grass_cli.commands.inspect import probe_profile
    from grass_cli.recipe import DataConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_factory("llama", 2)).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.model.embed_tokens.weight.requires_grad_(False)
    profile = probe_profile(
        model, tokenizer, DataConfig(train=TRAIN, max_length=64), TRAIN, 2, 2, torch.device("cpu")
    )
    assert len(profile.mgn) == 2 and len(profile.losses) == 2
    assert not model.training
    assert not model.model.embed_tokens.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def _write_run(run_dir: Path) -> None:
    events = [
        {"event": "start", "num_blocks": 3, "strategy": "grass", "model": "tiny"},
        {"event": "probe_done", "importance": [0.3, 0.1, 0.2], "ranking": [0, 2, 1]},
    ]
    active = [[0, 2], [0, 2], [1, 0], [1, 0], [0, 2]]
    for step, act in enumerate(active):
        imp = [0.3 - 0.01 * step, 0.1, 0.2 + 0.01 * step]
        events.append({"event": "step", "step": step, "active": act, "importance": imp})
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


def test_run_dir_shows_the_importance_history(tmp_path):
    run_dir = tmp_path / "run"
    _write_run(run_dir)
    res = runner.invoke(app, ["inspect-importance", str(run_dir)])
    assert res.exit_code == 0, res.output
    result = json.loads((run_dir / "importance/importance.json").read_text())
    assert result["active_counts"] == [5, 2, 3]
    assert result["probe"] == [0.3, 0.1, 0.2]
    assert result["last_importance"] == pytest.approx([0.26, 0.1, 0.24])
    assert (result["steps"], result["last_step"], result["strategy"]) == (5, 4, "grass")
    for name in ("importance_heatmap.png", "active_counts.png"):
        assert (run_dir / "importance" / name).read_bytes()[:8] == PNG
    table = history_table(result)
    assert cells(table, 1) == ["5", "2", "3"]
    assert cells(table, 4) == [format_mgn(v) for v in result["last_importance"]]
    assert "trained" in res.stdout
    assert str(run_dir / "importance" / "active_counts.png") in res.stdout


def test_clear_errors(tiny_factory, tmp_path):
    model = str(tiny_factory("llama", 2))
    res = runner.invoke(app, ["inspect-importance", model, "--data", str(tmp_path / "x.jsonl")])
    assert res.exit_code == 2 and "x.jsonl" in res.stderr and "not found" in res.stderr
    res = runner.invoke(app, ["inspect-importance", model])
    assert res.exit_code == 2 and "--data" in res.stderr
    res = runner.invoke(
        app, ["inspect-importance", model, "--data", TRAIN, "--field", "prompt=question"]
    )
    assert res.exit_code == 2 and "'question'" in res.stderr
    empty_run = tmp_path / "run"
    empty_run.mkdir()
    (empty_run / "metrics.jsonl").write_text(json.dumps({"event": "start"}) + "\n")
    res = runner.invoke(app, ["inspect-importance", str(empty_run)])
    assert res.exit_code == 2 and "no training step" in res.stderr


def test_ranks_and_bars():
    assert ranks([0.2, 0.5, None, 0.1]) == ([2, 1, 4, 3], [1, 0, 3, 2])
    assert bar(1.0, 1.0, 4) == "████"
    assert bar(0.5, 1.0, 4) == "██"
    assert bar(0.0625, 1.0, 4) == "▎"  # 2 eighths of a cell
    assert bar(None, 1.0) == "" and bar(1.0, 0.0) == ""


def test_data_may_be_a_saved_folder_and_a_missing_hub_dataset_fails_first(
    tiny_factory, tmp_path, monkeypatch
):
    """--data takes any data source training takes; a hub dataset that is not there
    (offline, not cached) fails before the model loads, in one message."""
    import datasets

    _mixture(tmp_path)  # writes tmp_path/folder
    args = ["inspect-importance", str(tiny_factory("llama", 2)), "--batches", "1"]
    args += ["--batch-size", "2", "--json", "--out", str(tmp_path / "out")]
    res = runner.invoke(app, [*args, "--data", str(tmp_path / "folder")])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert result["data"] == str(tmp_path / "folder") and len(result["mgn"]) == 2
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "empty"))
    res = runner.invoke(app, [*args, "--data", "someorg/not-here"])
    assert res.exit_code != 0 and "not in the datasets cache" in res.output
    assert "Traceback" not in res.output
