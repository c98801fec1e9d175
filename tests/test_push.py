"""`grass push`: the upload plan of a run (every model file, the heatmap, a card written
from the run) checked without network; no token, offline, a bad repo id and a folder
that holds no model are one message each, before anything is sent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from grass_cli.push import plan_push

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def run_dir(tiny_factory, tmp_path) -> Path:
    """A finished run's folder, as grass train leaves it: final/, recipe, summary,
    the importance heatmap, a `grass eval` result and a task eval during training."""
    run = tmp_path / "run"
    shutil.copytree(tiny_factory("llama", 4), run / "final")
    (run / "recipe.yaml").write_text(
        "model:\n  path: qwen2.5-0.5b\ndata:\n  train: data/quickstart/train.jsonl\n"
        "sampler:\n  strategy: lisa\n  gamma: 2\ntraining:\n  max_steps: 50\n  seed: 7\n"
    )
    (run / "summary.json").write_text(json.dumps({"steps": 50, "final_eval_loss": 0.8512}))
    (run / "plots").mkdir()
    (run / "plots" / "importance_heatmap.png").write_bytes(b"\x89PNG fake")
    (run / "eval" / "step-50").mkdir(parents=True)
    (run / "eval" / "result.json").write_text(json.dumps({"accuracy": 0.185}))
    (run / "eval" / "step-50" / "result.json").write_text(json.dumps({"loss": 1.25}))
    harness = {"tasks": {"arc_easy": {"acc": 0.4, "acc_stderr": 0.02, "acc_norm": 0.38}}}
    (run / "eval" / "harness.json").write_text(json.dumps(harness))
    (run / "checkpoints" / "step-0000050").mkdir(parents=True)
    shutil.copytree(run / "final", run / "checkpoints" / "step-0000050", dirs_exist_ok=True)
    return run


def test_the_plan_is_the_model_the_heatmap_and_a_card_from_the_run(run_dir):
    plan = plan_push(str(run_dir), "me/smol-lisa", private=True)
    listed = dict(plan.listing())
    model_files = {p.name for p in (run_dir / "final").iterdir()}
    assert set(listed) == model_files | {"README.md", "importance_heatmap.png"}
    assert listed["model.safetensors"] == (run_dir / "final/model.safetensors").stat().st_size
    card = plan.card
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "base_model: Qwen/Qwen2.5-0.5B-Instruct" in card  # the preset's hub id
    assert "- lisa" in card and "# smol-lisa" in card
    for row in ("| strategy | lisa |", "| blocks trained at once (gamma) | 2 |", "| steps | 50 |",
                "| seed | 7 |", "| final eval loss | 0.8512 |", "| accuracy (eval) | 0.1850 |",
                "| loss (eval/step-50) | 1.2500 |",
                "| arc_easy acc (lm-evaluation-harness) | 0.4000 ± 0.0200 |",
                "| arc_easy acc_norm (lm-evaluation-harness) | 0.3800 |"):  # fmt: skip
        assert row in card, row
    assert "![importance over training](importance_heatmap.png)" in card
    assert "```yaml\nmodel:\n  path: qwen2.5-0.5b" in card
    assert plan.total_bytes == sum(listed.values())


def test_a_checkpoint_folder_pushes_with_its_runs_card(run_dir):
    plan = plan_push(str(run_dir / "checkpoints" / "step-0000050"), "me/ckpt")
    assert "| strategy | lisa |" in plan.card
    assert {d for _, d in plan.files} >= {"model.safetensors", "config.json"}


def grass(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "grass_cli", *args], capture_output=True, text=True,
        env={**os.environ, **env},
    )  # fmt: skip


def test_dry_run_prints_the_plan_and_sends_nothing(run_dir):
    res = grass("push", str(run_dir), "--repo", "me/smol-lisa", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("would upload to me/smol-lisa:")
    assert "  model.safetensors  " in res.stdout and "--- README.md ---" in res.stdout


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--repo", "me/x"], {"HF_TOKEN": "", "HF_HUB_OFFLINE": "0"}, "no Hugging Face token"),
        (["--repo", "me/x"], {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set"),
        (["--repo", "no-slash", "--dry-run"], {}, "'no-slash' is not a Hub repo id"),
    ],
)
def test_what_stops_a_push_is_one_message(run_dir, tmp_path, args, env, message):
    res = grass("push", str(run_dir), *args, HF_HOME=str(tmp_path / "hf-home"), **env)
    assert res.returncode == 2 and message in res.stderr
    assert res.stdout == "" and "Traceback" not in res.stderr


def test_a_folder_without_a_model_is_refused(tmp_path):
    res = grass("push", str(tmp_path), "--repo", "me/x", "--dry-run")
    assert res.returncode == 2 and "not a run folder" in res.stderr
    (tmp_path / "recipe.yaml").write_text("model:\n  path: x\n")
    res = grass("push", str(tmp_path), "--repo", "me/x", "--dry-run")
    assert res.returncode == 2 and "the run has no final model" in res.stderr
