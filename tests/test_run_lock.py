"""One live run per run folder (engine/run_lock.py), with real processes: a second
`grass train` into a live run's folder is refused at once, naming the live process,
whether it starts fresh, resumes or overwrites; readers work beside a live run; a lock
left by a SIGKILLed run is taken over, and said so; a finished run leaves no lock."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
from helpers import grass
from test_checkpoint import EVAL, _spawn_train, _wait_for_step, make_recipe

from grass_cli.checkpoint import find_latest
from grass_cli.engine import setup, train
from grass_cli.engine.run_lock import LOCK, holder
from grass_cli.telemetry import Telemetry

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def live(tiny_llama, tmp_path):
    """A real `grass train` that has trained a few steps and holds its folder."""
    rec = make_recipe(
        tiny_llama,
        tmp_path / "run",
        training={"max_steps": 100_000},
        checkpoint={"interval": 3, "keep_last": 1000},  # (a reader's checkpoint stays)
    )
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(rec.to_yaml())
    proc = _spawn_train(recipe_file)
    _wait_for_step(proc, 4)  # a checkpoint at step 3 exists
    yield proc, recipe_file, tmp_path / "run"
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_a_second_train_into_a_live_run_is_refused_at_once(live):
    proc, recipe_file, run = live
    info = holder(run)
    assert info is not None and info["pid"] == proc.pid and "grass_cli" in info["command"]
    marker = (run / ".grass-run.json").read_bytes()
    for extra in ([], ["--resume", "auto"], ["--overwrite"]):
        t0 = time.perf_counter()
        res = grass("train", str(recipe_file), "--no-live", *extra)
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert f"a run is live in this folder: process {proc.pid} on " in res.stderr
        assert f"kill -TERM {proc.pid}" in res.stderr
        assert time.perf_counter() - t0 < 30  # refused before any model or data loads
    assert proc.poll() is None  # the live run goes on, its folder untouched
    assert (run / ".grass-run.json").read_bytes() == marker
    events = [json.loads(x) for x in (run / "metrics.jsonl").open()]
    steps = [e["step"] for e in events if e["event"] == "step"]
    assert steps == sorted(set(steps))  # one writer: no step twice, none out of order
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    assert holder(run) is None and not (run / LOCK).exists()  # an ended run leaves no lock


def test_readers_work_beside_a_live_run(live, tmp_path):
    proc, _, run = live
    res = grass("plot", str(run))
    assert res.returncode == 0, res.stderr
    res = grass("inspect-importance", str(run), "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)
    ckpt = find_latest(run)
    res = grass("eval", str(ckpt), "--data", EVAL, "--limit", "4", "--out",
                str(tmp_path / "ev"), "--json")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert proc.poll() is None and holder(run)["pid"] == proc.pid


def test_a_lock_left_by_a_killed_run_is_taken_over(live):
    proc, recipe_file, run = live
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((run / LOCK).read_text())["pid"] == proc.pid  # left behind
    assert holder(run) is None  # but nobody holds it
    res = grass("train", str(recipe_file), "--no-live", "--resume", "auto",
                "training.max_steps=8")  # fmt: skip
    assert res.returncode == 0, res.stderr
    said = f"the run folder's lock was left by process {proc.pid} on "
    told = res.stdout + res.stderr  # (plain mode prints warnings among the step lines)
    assert said in told and "which is no longer running; taken over" in told
    events = [json.loads(x) for x in (run / "metrics.jsonl").open()]
    assert any(said in e.get("message", "") for e in events if e["event"] == "warning")
    assert not (run / LOCK).exists()


def test_one_process_may_build_a_run_twice_and_a_foreign_folder_gets_no_lock(tiny_llama, tmp_path):
    rec = make_recipe(tiny_llama, tmp_path / "run", training={"max_steps": 2})
    first = setup(rec, Telemetry([]))  # never trained: still holds the folder
    assert holder(tmp_path / "run")["pid"] == os.getpid()
    again = setup(rec, Telemetry([]), overwrite=True)  # the same process: re-entrant
    assert again.lock is first.lock
    train(again)
    assert holder(tmp_path / "run") is None
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    rec2 = make_recipe(tiny_llama, theirs)
    with pytest.raises(Exception, match="holds files that grass did not write"):
        setup(rec2, Telemetry([]))
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]
