"""Every bad input gets one clear message and exit code 2, and nothing is written or lost."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from grass_cli.cli import app

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "data/quickstart/train.jsonl")
runner = CliRunner()


def base(model_dir: Path, out: Path) -> dict:
    return {
        "model": {"path": str(model_dir)},
        "data": {"train": TRAIN, "max_length": 64, "limit": 16},
        "sampler": {"strategy": "lisa", "gamma": 2, "switch_interval": 2},
        "training": {"max_steps": 2, "micro_batch_size": 4},
        "output": {"dir": str(out)},
    }


def train(tmp_path: Path, recipe: dict | str, *args: str):
    path = tmp_path / "r.yaml"
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe))
    return runner.invoke(app, ["train", str(path), "--no-live", *args])


def expect_error(res, *fragments: str, code: int = 2) -> None:
    assert res.exit_code == code, (res.exit_code, res.output)
    assert res.stderr.startswith("Error: "), res.stderr
    for frag in fragments:
        assert frag in res.stderr, (frag, res.stderr)
    assert "Traceback" not in res.output


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def model(tiny_factory):
    return tiny_factory("llama", 4)


def test_malformed_yaml(tmp_path):
    res = train(tmp_path, "data:\n  train: x\n sampler: [\n")
    expect_error(res, "r.yaml:3:", "malformed YAML")


def test_unknown_key(tmp_path, model):
    rec = base(model, tmp_path / "run")
    rec["optimizer"] = {"learning_rate": 1e-4}
    expect_error(
        train(tmp_path, rec), "optimizer.learning_rate: unknown key", "ours is 'optimizer.lr'"
    )
    assert not (tmp_path / "run").exists()


def test_wrong_type_and_range(tmp_path, model):
    rec = base(model, tmp_path / "run")
    rec["training"]["micro_batch_size"] = "eight"
    rec["sampler"]["alpha"] = 1.5
    expect_error(
        train(tmp_path, rec),
        "invalid recipe (2 errors)",
        "training.micro_batch_size: Input should be a valid integer",
        "sampler.alpha: Input should be less than or equal to 1; got 1.5",
    )


def test_missing_model_path(tmp_path, model):
    rec = base(tmp_path / "no-such-model", tmp_path / "run")
    expect_error(train(tmp_path, rec), f"model.path: {tmp_path / 'no-such-model'}: model not found")
    assert not (tmp_path / "run").exists()


def test_missing_data_file(tmp_path, model):
    rec = base(model, tmp_path / "run")
    rec["data"]["train"] = str(tmp_path / "missing.jsonl")
    expect_error(train(tmp_path, rec), "missing.jsonl")
    assert not (tmp_path / "run").exists()


def test_rows_missing_fields(tmp_path, model):
    rec = base(model, tmp_path / "run")
    rec["data"]["train"] = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}]
    )
    expect_error(train(tmp_path, rec), "d.jsonl:row 2", "completion")
    assert not (tmp_path / "run").exists()


def test_malformed_jsonl_names_the_line(tmp_path, model):
    rec = base(model, tmp_path / "run")
    good = '{"prompt": "a", "completion": "b"}\n'
    bad = tmp_path / "d.jsonl"
    rec["data"]["train"] = str(bad)
    bad.write_text(good * 3 + '{"prompt": "a" "completion": "b"}\n' + good)
    expect_error(
        train(tmp_path, rec),
        f"{bad}:4: cannot parse this json file: not valid JSON",
        "(Expecting ',' delimiter at column 16)",
        "one complete JSON object per line",
    )
    # A cut line running into the next: once "Column(/completion) changed ... in row 3".
    bad.write_text(good * 3 + '{"prompt": "a", "completion": \n' + good)
    expect_error(train(tmp_path, rec), f"{bad}:4:", "not valid JSON (Expecting value")
    # A null line: once a segmentation fault in the JSON reader.
    bad.write_text(good + "null\n" + good)
    expect_error(train(tmp_path, rec), f"{bad}:2:", "expected a JSON object {...}, got null")
    assert not (tmp_path / "run").exists()


def test_missing_column_names_file_and_column(tmp_path, model):
    rec = base(model, tmp_path / "run")
    rec["data"]["train"] = write_jsonl(tmp_path / "d.jsonl", [{"question": "a", "answer": "b"}])
    expect_error(train(tmp_path, rec), "d.jsonl", "prompt", "data.fields")


def test_empty_dataset(tmp_path, model):
    rec = base(model, tmp_path / "run")
    (tmp_path / "empty.jsonl").write_text("")
    rec["data"]["train"] = str(tmp_path / "empty.jsonl")
    expect_error(train(tmp_path, rec), "empty.jsonl", "no rows")


def test_rows_without_trainable_tokens(tmp_path, model):
    rec = base(model, tmp_path / "run")
    rec["data"]["train"] = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "word " * 80, "completion": "answer"}] * 3
    )
    expect_error(train(tmp_path, rec), "d.jsonl", "no trainable tokens", "data.truncation: left")


def test_sequence_longer_than_model(tmp_path, tiny_factory):
    rec = base(tiny_factory("gpt2", 2), tmp_path / "run")  # n_positions 512
    rec["data"]["max_length"] = 4096
    expect_error(train(tmp_path, rec), "data.max_length is 4096 but the model handles at most 512")
    assert not (tmp_path / "run").exists()


def test_gamma_above_blocks(tmp_path, model):
    rec = base(model, tmp_path / "run")
    rec["sampler"]["gamma"] = 7
    expect_error(
        train(tmp_path, rec),
        "sampler.gamma is 7 but the model has only 4 blocks",
        "set sampler.gamma to at most 4",
    )
    assert not (tmp_path / "run").exists()


def test_unwritable_run_dir(tmp_path, model):
    blocker = tmp_path / "file"
    blocker.write_text("")
    rec = base(model, blocker / "run")
    expect_error(train(tmp_path, rec), "cannot write to the run dir", "output.dir")
    if os.geteuid() != 0:  # root ignores permission bits
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        expect_error(train(tmp_path, base(model, ro / "run")), "cannot write to the run dir")


def test_damaged_checkpoint(tmp_path, model):
    rec = base(model, tmp_path / "run")
    assert train(tmp_path, rec).exit_code == 0
    ckpt = tmp_path / "run/checkpoints/step-0000002"
    (ckpt / "state.safetensors").write_bytes(b"not a checkpoint")
    before = (tmp_path / "run/metrics.jsonl").read_bytes()
    res = train(tmp_path, rec, "--resume", str(ckpt))
    expect_error(
        res, "damaged checkpoint: state.safetensors is missing or does not match its checksum"
    )
    assert (tmp_path / "run/metrics.jsonl").read_bytes() == before  # nothing lost


def test_existing_run_refused_and_resume_overwrite_exclusive(tmp_path, model):
    rec = base(model, tmp_path / "run")
    assert train(tmp_path, rec).exit_code == 0
    rec["training"]["seed"] = 7
    expect_error(
        train(tmp_path, rec),
        "already holds a run of a different recipe",
        "--resume auto",
        "--overwrite",
    )
    expect_error(
        train(tmp_path, rec, "--resume", "auto", "--overwrite"),
        "--resume and --overwrite cannot be used together",
    )
