"""The W&B sink, offline: what the run folder's W&B files hold, resume, disabled mode, refusals.

Nothing here reaches the network: every W&B run is offline (WANDB_MODE and the
recipes say so), and W&B's own folders point into the test's tmp_path. The
offline run file (run-ID.wandb) is read back record by record, so the tests
check what `wandb sync` would upload, not what the sink meant to log.
"""

from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest
from test_dashboard import synthetic_run
from typer.testing import CliRunner

from grass_cli.cli import app
from grass_cli.errors import GrassError
from grass_cli.recipe.wandb_config import WandbConfig
from grass_cli.telemetry.wandb import RUN_ID_FILE, WandbSink

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "data/quickstart/train.jsonl")
EVAL = str(ROOT / "data/quickstart/eval.jsonl")
runner = CliRunner()


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch, tmp_path):
    """Offline, silent, and every folder W&B keeps outside a run in tmp_path."""
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": tmp_path / "wandb-dir",
        "WANDB_CONFIG_DIR": tmp_path / "wandb-config",
        "WANDB_CACHE_DIR": tmp_path / "wandb-cache",
        "WANDB_DATA_DIR": tmp_path / "wandb-data",
    }.items():
        monkeypatch.setenv(key, str(value))


def records(run_file: Path) -> list:
    """Every record of an offline W&B run file, once W&B's service has written its
    last (`exit`) record: under load, the file can lag `finish()` by a moment."""
    deadline = time.monotonic() + 30
    while True:
        out = _parse(run_file.read_bytes())
        if (out and out[-1].WhichOneof("record_type") == "exit") or time.monotonic() > deadline:
            return out
        time.sleep(0.1)


def _parse(data: bytes) -> list:
    """The records of a run file: a LevelDB-style log (32 KiB blocks) of protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    assert data[:4] == b":W&B"
    pos, block, out, buf = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def history(run_file: Path) -> list[dict]:
    rows = []
    for r in records(run_file):
        if r.WhichOneof("record_type") == "history":
            rows.append(
                {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
            )
    return rows


def config(run_file: Path) -> dict:
    """The run's config; a nested update (W&B's own chart specs) under its key path."""
    out: dict = {}
    for r in records(run_file):
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            for u in (r.run.config if kind == "run" else r.config).update:
                out[u.key or tuple(u.nested_key)] = json.loads(u.value_json)
    return out


def series(rows: list[dict], key: str, step: str = "train/step") -> list[tuple]:
    return [(row[step], row[key]) for row in rows if key in row]


def test_sink_logs_the_tensorboard_scalars_and_block_charts(tmp_path):
    pytest.importorskip("wandb")
    run_dir = tmp_path / "run"
    sink = WandbSink(WandbConfig(project="grass-test"), run_dir, {"sampler": {"gamma": 2}})
    sink.emit({"event": "warning", "message": "tied embeddings"})  # before start
    assert not run_dir.exists(), "nothing is written before the run starts"
    for e in synthetic_run(num_blocks=8, steps=12, gamma=2, switch_interval=5, eval_every=10):
        sink.emit(e)
    sink.close()
    (run_file,) = offline_runs(run_dir)
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    assert run_file.name == f"run-{run_id}.wandb"
    rows = history(run_file)
    loss = series(rows, "train/loss")
    assert [s for s, _ in loss] == list(range(12))
    assert [round(v, 4) for _, v in loss] == [round(2.0 - 0.05 * s, 4) for s in range(12)]
    assert series(rows, "eval/loss") == [(0, 2.5), (10, 1.5)]
    assert [s for s, _ in series(rows, "probe/loss", "probe/step")] == [0, 1]
    assert [v for _, v in series(rows, "memory/optimizer_state_mib")] == [
        100.0 + 10 * s for s in range(12)
    ]
    # MGN and p are logged when they change; block 7's MGN is unknown until step 10
    assert series(rows, "importance/block_07")[0][0] == 10
    assert series(rows, "importance/block_01")[0][0] == 0
    assert [v for _, v in series(rows, "train/active_blocks")] == [2] * 12
    last = rows[-1]
    assert last["train/step"] == 11
    for chart in ("blocks/history", "blocks/importance_heatmap"):
        assert any(k.startswith(chart + "/") for k in last), chart
    cfg = config(run_file)
    assert cfg["sampler"] == {"gamma": 2} and cfg["run"]["num_blocks"] == 8
    visualize = ("_wandb", "visualize")
    charts = {key[2] for key in cfg if isinstance(key, tuple) and key[:2] == visualize}
    assert charts == {"blocks/importance", "blocks/active_counts"}


def test_block_history_table_is_thinned_to_what_wandb_logs():
    from grass_cli.telemetry.wandb_history import MAX_TABLE_ROWS, BlockHistory

    h = BlockHistory()
    for s in range(3000):  # new MGN every step, 8 blocks: 24000 rows unthinned
        h.add({"step": s, "active": [s % 8], "importance": [float(s)] * 8, "probabilities": None})
    picked = h.picked_changes()
    rows = h.table_rows(picked)
    assert len(rows) <= MAX_TABLE_ROWS and picked[-1]["step"] == 2999
    assert rows[:2] == [[0, 0, 0.0, None, True], [0, 1, 0.0, None, False]]
    assert h.active_counts() == [375] * 8
    (block, xs, ys), *_ = h.importance_series(picked)
    assert block == 0 and xs == ys and len(xs) == len(picked)


def test_disabled_mode_imports_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not even needed installed
    run_dir = tmp_path / "run"
    sink = WandbSink(WandbConfig(mode="disabled"), run_dir, {})
    for e in synthetic_run(num_blocks=4, steps=3, gamma=2):
        sink.emit(e)
    sink.close()
    assert not run_dir.exists()


def test_a_refused_wandb_start_is_one_user_error(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    sink = WandbSink(WandbConfig(mode="online"), tmp_path / "run", {})
    with pytest.raises(GrassError) as err:
        sink.emit(synthetic_run()[0])
    assert str(err.value).startswith(
        "output.wandb: cannot start the W&B run: api_key not configured (no-tty)"
    )
    assert "output.wandb.mode: offline" in str(err.value)
    sink.close()


def write_recipe(tmp_path: Path, model_dir: Path, **wandb) -> Path:
    import yaml

    recipe = {
        "model": {"path": str(model_dir)},
        "data": {"train": TRAIN, "eval": EVAL, "max_length": 64, "limit": 24, "eval_limit": 8},
        "sampler": {"strategy": "grass", "gamma": 2, "switch_interval": 1, "probe_steps": 2},
        "training": {"max_steps": 2, "micro_batch_size": 4, "seed": 0},
        "output": {"dir": str(tmp_path / "run"), "save_model": False, "wandb": wandb},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_train_offline_then_resume_continues_the_same_wandb_run(tiny_llama, tmp_path):
    pytest.importorskip("wandb")
    rec = write_recipe(tmp_path, tiny_llama, project="grass-test", mode="offline", tags=["t"])
    res = runner.invoke(app, ["train", str(rec), "--no-live"])
    assert res.exit_code == 0, res.output
    run_dir = tmp_path / "run"
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    res = runner.invoke(
        app, ["train", str(rec), "training.max_steps=4", "--resume", "auto", "--no-live"]
    )
    assert res.exit_code == 0, res.output
    assert (run_dir / RUN_ID_FILE).read_text().strip() == run_id
    first, second = offline_runs(run_dir)
    assert first.name == second.name == f"run-{run_id}.wandb", "one W&B run, continued"
    assert [s for s, _ in series(history(first), "train/loss")] == [0, 1]
    assert [s for s, _ in series(history(second), "train/loss")] == [2, 3]
    assert series(history(first), "eval/loss")[0][0] == 0
    cfg = config(first)
    assert cfg["output"]["wandb"]["project"] == "grass-test"
    assert cfg["run"]["attention"] == "sdpa" and cfg["training"]["max_steps"] == 2
    assert config(second)["training"]["max_steps"] == 4
    # the resumed run's block charts cover the whole run, read back from metrics.jsonl
    (table,) = (second.parent / "files/media/table/blocks").glob("history_*.table.json")
    steps = {row[0] for row in json.loads(table.read_text())["data"]}
    assert min(steps) == 0 and max(steps) == 3


def test_missing_wandb_is_refused_before_anything_loads(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    rec = write_recipe(tmp_path, tiny_llama, project="p")
    for command in (["validate", str(rec)], ["train", str(rec), "--no-live"]):
        res = runner.invoke(app, command)
        assert res.exit_code == 2, res.output
        assert "output.wandb: output.wandb is set but the wandb package is not installed" in (
            res.stderr
        )
        assert "pip install 'grass-cli[wandb]'" in res.stderr
    assert not (tmp_path / "run").exists()


def test_online_mode_needs_a_login(tiny_llama, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    rec = write_recipe(tmp_path, tiny_llama, project="p")
    res = runner.invoke(app, ["validate", str(rec)])
    assert res.exit_code == 2
    assert "no W&B login was found" in res.stderr and "wandb login" in res.stderr
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password x\n")
    res = runner.invoke(app, ["validate", str(rec)])
    assert res.exit_code == 0, res.output
