"""`grass eval --harness`: lm-evaluation-harness on the model grass loads, checked
against `grass eval --kind choice` on the same 24 items of a local harness task
(tests/harness/), its results in the run's eval folder, and one message for a task
name it does not know, options it does not take, data it cannot find, or a missing
install."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import grass

pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT / "tests/harness"
TASK = "grass_arith_mc"


@pytest.fixture
def task_dir(tmp_path) -> Path:
    """The shipped task YAML with its data file's absolute path (the harness reads
    data_files relative to the current folder)."""
    out = tmp_path / "tasks"
    out.mkdir()
    text = (TASKS / f"{TASK}.yaml").read_text()
    text = text.replace("test: arith_mc.jsonl", f"test: {TASKS / 'arith_mc.jsonl'}")
    (out / f"{TASK}.yaml").write_text(text)
    return out


@pytest.mark.slow
def test_the_harness_and_grass_eval_score_the_same_items_alike(smollm2_dir, task_dir, tmp_path):
    """Real SmolLM2: per item, the harness's log-likelihood of each choice equals grass
    eval's (no chat template, summed over the choice's tokens), so the pick and the
    accuracy are the same."""
    import torch
    from transformers import AutoModelForCausalLM

    from grass_cli.eval_config import EvalConfig
    from grass_cli.evaluate import run_eval
    from grass_cli.evaluate.harness import check_tasks, run_harness
    from grass_cli.models import load_tokenizer
    from grass_cli.recipe import DataConfig

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    tok = load_tokenizer(str(smollm2_dir))
    data = str(TASKS / "arith_mc.jsonl")
    ours = run_eval(
        model, tok, EvalConfig(data=data, kind=["choice"]),
        DataConfig(train=data, chat_template="never"), torch.device("cpu"), tmp_path / "ours",
    )  # fmt: skip
    theirs = run_harness(model, tok, [TASK], check_tasks([TASK], task_dir), tmp_path / "h")
    assert theirs["n_samples"] == {TASK: 24}
    assert theirs["tasks"][TASK]["acc"] == ours["choice_accuracy"]
    assert 0.2 < ours["choice_accuracy"] < 1.0  # a real score, neither chance-free nor perfect
    items = [json.loads(x) for x in (tmp_path / "ours/predictions.jsonl").open()]
    samples = [json.loads(x) for x in (tmp_path / f"h/harness-samples/{TASK}.jsonl").open()]
    assert len(samples) == 24
    for s in samples:
        mine = items[s["doc_id"]]["choice_logprobs"]
        their = [ll for ll, _ in s["filtered_resps"]]
        assert their == pytest.approx(mine, abs=1e-4)
        assert s["acc"] == float(items[s["doc_id"]]["choice_correct"])


def test_a_run_dir_gets_harness_json_next_to_its_own_scores(tiny_factory, task_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_factory("llama", 2), run / "final")
    (run / "recipe.yaml").write_text(
        f"model: {{path: {run / 'final'}}}\ndata: {{train: x.jsonl}}\n"
    )
    res = grass("eval", str(run), "--harness", TASK, "--harness-include", str(task_dir),
                "--limit", "10", "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""  # the harness's bars and git's complaints stay off stderr
    out = json.loads(res.stdout)
    assert out["n_samples"] == {TASK: 10} and 0.0 <= out["tasks"][TASK]["acc"] <= 1.0
    saved = json.loads((run / "eval/harness.json").read_text())
    assert saved["tasks"] == out["tasks"] and saved["limit"] == 10
    assert saved["versions"] == {TASK: 1.0} and saved["chat_template"] is False
    lines = (run / f"eval/harness-samples/{TASK}.jsonl").read_text().splitlines()
    assert len(lines) == 10 and "filtered_resps" in json.loads(lines[0])


def test_mistakes_are_one_message_before_the_model_loads(tiny_factory, task_dir, tmp_path):
    model = str(tiny_factory("llama", 2))
    res = grass("eval", model, "--harness", "grass_arith_m", "--harness-include", str(task_dir))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "has no task 'grass_arith_m' (did you mean grass_arith_mc?)" in res.stderr
    res = grass("eval", model, "--harness", TASK, "--data", "x.jsonl")
    assert res.returncode == 2 and "--data is grass eval's own" in res.stderr
    res = grass("eval", model, "--harness", TASK, "--harness-include", str(tmp_path / "none"))
    assert res.returncode == 2 and "not a folder of task YAML files" in res.stderr
    relative = tmp_path / "relative"
    relative.mkdir()
    shutil.copy(TASKS / f"{TASK}.yaml", relative)  # data_files: arith_mc.jsonl, not here
    res = grass("eval", model, "--harness", TASK, "--harness-include", str(relative))
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "could not load its data" in res.stderr and "give an absolute path" in res.stderr


def test_without_lm_eval_installed_it_says_how_to_install(tiny_factory):
    # lm_eval made unimportable in the child, as on a machine without the extra
    code = (
        "import sys; sys.modules['lm_eval'] = None\n"
        "from grass_cli.cli import main\n"
        f"sys.argv = ['grass', 'eval', {str(tiny_factory('llama', 2))!r}, '--harness', 'x']\n"
        "main()\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "needs EleutherAI's lm-evaluation-harness" in res.stderr
    assert "pip install 'grass-cli[harness]'" in res.stderr
