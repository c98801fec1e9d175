"""Pre-flight: `grass validate` and the start of `grass train` catch, before the model
loads and before the run folder gets a file, every mistake that needs no weights."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from grass_cli.cli import app

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "data/quickstart/train.jsonl")
runner = CliRunner()


def recipe(model_dir: Path, out: Path, **extra) -> dict:
    rec = {
        "model": {"path": str(model_dir)},
        "data": {"train": TRAIN, "max_length": 64, "limit": 16},
        "sampler": {"strategy": "lisa", "gamma": 2, "switch_interval": 2},
        "training": {"max_steps": 2, "micro_batch_size": 4},
        "output": {"dir": str(out), "save_model": False},
        "checkpoint": {"at_end": False},
    }
    for key, value in extra.items():
        rec.setdefault(key, {}).update(value)
    return rec


def invoke(tmp_path: Path, command: str, rec: dict, *args: str):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rec))
    return runner.invoke(app, [command, str(path), *args])


@pytest.mark.parametrize("command", ["validate", "train"])
def test_missing_data_and_model_are_caught_without_loading(command, tmp_path, tiny_llama):
    out = tmp_path / "run"
    res = invoke(tmp_path, command, recipe(tiny_llama, out), "data.train=/nope.jsonl")
    assert res.exit_code == 2 and "/nope.jsonl" in res.stderr, res.output
    t0 = time.perf_counter()
    res = invoke(tmp_path, command, recipe(tiny_llama, out), "model.path=/nope/model")
    assert res.exit_code == 2 and "model.path" in res.stderr, res.output
    assert time.perf_counter() - t0 < 20  # no model loaded, no retries
    assert not out.exists()  # nothing written


def test_validate_reports_what_it_checked(tmp_path, tiny_llama):
    res = invoke(tmp_path, "validate", recipe(tiny_llama, tmp_path / "run"))
    assert res.exit_code == 0, res.output
    assert "valid (" in res.stderr and "data.train 16" not in res.stderr
    assert "data.train 2000 rows" in res.stderr  # every row parsed (limit applies later)
    assert not (tmp_path / "run").exists()


def test_unwritable_offload_path_is_caught_before_any_file(tmp_path, tiny_llama):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the folder would go (refused even for root)")
    ro = blocker / "offload"
    out = tmp_path / "run"
    bad = recipe(
        tiny_llama,
        out,
        optimizer={"state_policy": "offload", "offload": {"target": "disk", "path": str(ro)}},
    )
    res = invoke(tmp_path, "train", bad, "--no-live")
    assert res.exit_code == 2, res.output
    assert "optimizer.offload.path" in res.stderr and "cannot write there" in res.stderr
    assert not out.exists()  # so the corrected retry is not "a different recipe"
    bad["optimizer"]["offload"]["path"] = str(tmp_path / "offload")
    res = invoke(tmp_path, "train", bad, "--no-live")
    assert res.exit_code == 0, res.output


SMALL_FS = """
set -e
mkdir -p "$1"
mount -t tmpfs -o size=2m tmpfs "$1"
"""


def test_not_enough_disk_space_is_caught_before_training(tmp_path, tiny_llama):
    """A real 2 MB filesystem (tmpfs; needs mount rights) for a run that saves a 6 MB
    model: refused at once, with the sizes, and nothing written there."""
    small = tmp_path / "small"
    mounted = subprocess.run(["sh", "-c", SMALL_FS, "sh", str(small)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small filesystem here")
    try:
        rec = recipe(tiny_llama, small / "run", output={"save_model": True})
        for command, args in (("validate", ()), ("train", ("--no-live",))):
            res = invoke(tmp_path, command, rec, *args)
            assert res.exit_code == 2, res.output
            assert "not enough disk space" in res.stderr and "GB is free" in res.stderr
            assert "Traceback" not in res.output
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_preflight_runs_without_torch_in_validate_help():
    res = subprocess.run(
        [sys.executable, "-c", "import sys, grass_cli.cli; print('torch' in sys.modules)"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert res.stdout.strip() == "False"


def test_missing_columns_are_caught_before_the_model_loads(tmp_path, tiny_llama):
    data = tmp_path / "d.jsonl"
    data.write_text('{"question": "q", "answer": "a"}\n')
    rec = recipe(
        tiny_llama, tmp_path / "run", data={"train": str(data), "format": "prompt-completion"}
    )
    res = invoke(tmp_path, "validate", rec)
    assert res.exit_code == 2, res.output
    assert "column 'prompt' for the prompt-completion field 'prompt' not found" in res.stderr
