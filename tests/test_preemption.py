"""Preemption: a stop never waits for an evaluation, light checkpoints on a signal,
the time a SIGTERM needs, and SIGTERM through torchrun."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import ListSink
from test_checkpoint import StopAfter, make_recipe

from grass_cli.checkpoint import find_latest, read_state, verify
from grass_cli.engine import Interrupted, StopRequest, setup, train
from grass_cli.telemetry import Telemetry
from grass_cli.telemetry.sinks import PlainPrinter

ROOT = Path(__file__).resolve().parent.parent


class Both(ListSink):
    """Keeps every event and asks for a stop after step k (as a signal handler would)."""

    def __init__(self, k: int, stop: StopRequest):
        super().__init__()
        self.stopper = StopAfter(k, stop)

    def emit(self, event):
        super().emit(event)
        self.stopper.emit(event)


def test_a_stop_at_an_eval_step_checkpoints_first_and_the_resume_runs_the_eval(
    tiny_llama, tmp_path
):
    """Stopped right after step 6 (an eval is due there, eval_interval 3): the checkpoint
    is written before any eval, and the resume evaluates step 6 before training on;
    losses and eval losses equal a run never stopped."""
    straight = train(setup(make_recipe(tiny_llama, tmp_path / "a"), Telemetry([])))
    rec = make_recipe(tiny_llama, tmp_path / "b")
    stop = StopRequest()
    sink = Both(6, stop)
    with pytest.raises(Interrupted) as e:
        train(setup(rec, Telemetry([sink])), stop)
    assert e.value.step == 6
    kinds = [(ev["event"], ev.get("step")) for ev in sink.events]
    assert ("eval_start", 6) not in kinds and ("eval", 6) not in kinds  # not waited for
    assert kinds[-1][0] == "checkpoint" and kinds[-1][1] == 6
    assert read_state(e.value.checkpoint).progress.evals_due is True

    again = ListSink()
    resumed = train(setup(rec, Telemetry([again]), resume="auto"))
    after = [(ev["event"], ev.get("step")) for ev in again.events]
    assert after[:3] == [("resume", 6), ("eval_start", 6), ("eval", 6)]
    assert resumed.losses == straight.losses
    assert resumed.eval_losses == straight.eval_losses
    assert sorted(resumed.eval_losses) == [0, 3, 6, 7]


def test_a_light_checkpoint_on_a_signal_holds_no_optimizer_state_and_resumes_afresh(
    tiny_llama, tmp_path
):
    """checkpoint.on_signal: light: the stop's checkpoint has the weights and progress
    but no optimizer groups, is smaller than a full one, and resumes with a warning:
    the first step after it sees the same weights (same loss), the next update differs."""
    opt = {"state_policy": "offload", "offload": {"target": "disk", "residency": "step"}}
    straight = train(setup(make_recipe(tiny_llama, tmp_path / "a", optimizer=opt), Telemetry([])))
    rec = make_recipe(
        tiny_llama,
        tmp_path / "b",
        optimizer=opt,
        checkpoint={"interval": 2, "keep_last": 3, "on_signal": "light"},
    )
    stop = StopRequest()
    sink = Both(5, stop)
    with pytest.raises(Interrupted) as e:
        train(setup(rec, Telemetry([sink])), stop)
    light = e.value.checkpoint
    manifest = verify(light)
    assert manifest["light"] is True and manifest["step"] == 5
    index = json.loads((light / "optimizer" / "index.json").read_text())
    assert index["groups"] == [] and index["light"] is True
    full = light.parent / "step-0000004"
    assert verify(full)["light"] is False
    assert len(json.loads((full / "optimizer" / "index.json").read_text())["groups"]) > 0
    events = {ev["step"]: ev for ev in sink.events if ev["event"] == "checkpoint"}
    assert events[5]["light"] is True and events[4]["light"] is False
    assert 0 < events[5]["bytes"] < events[4]["bytes"]
    assert events[5]["bytes"] == sum(f.stat().st_size for f in light.rglob("*") if f.is_file())

    again = ListSink()
    resumed = train(setup(rec, Telemetry([again]), resume="auto"))
    warnings = [ev["message"] for ev in again.events if ev["event"] == "warning"]
    assert any("light checkpoint" in w and "not bit-identical" in w for w in warnings)
    assert resumed.losses[:6] == straight.losses[:6]  # step 6 trains on step 5's weights
    assert resumed.losses[6] != straight.losses[6]  # after an update with fresh moments
    assert len(resumed.losses) == 7


def test_the_summary_says_what_a_sigterm_needs(tiny_llama, tmp_path):
    """summary.json and the plain log give the slowest step plus the slowest checkpoint,
    and the grace period to ask for."""
    rec = make_recipe(tiny_llama, tmp_path / "run", checkpoint={"interval": 2})
    sink = ListSink()
    result = train(setup(rec, Telemetry([sink])))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    steps = [ev["step_time"] for ev in sink.events if ev["event"] == "step"]
    ckpts = [ev["seconds"] for ev in sink.events if ev["event"] == "checkpoint"]
    assert len(ckpts) == 4  # steps 2, 4, 6 and the end
    assert summary["slowest_step_s"] == max(steps) == result.progress.slowest_step_s
    assert summary["slowest_checkpoint_s"] == max(ckpts)
    assert summary["sigterm_needs_s"] == max(steps) + max(ckpts)
    end = next(ev for ev in sink.events if ev["event"] == "end")
    lines = PlainPrinter(io.StringIO()).summary_lines(end)
    preempt = [line for line in lines if line.startswith("preempt ")]
    assert len(preempt) == 1 and "SLURM --signal=TERM@10" in preempt[0]


def test_no_checkpoint_no_advice(tiny_llama, tmp_path):
    rec = make_recipe(tiny_llama, tmp_path / "run", checkpoint={"at_end": False})
    train(setup(rec, Telemetry([])))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["slowest_checkpoint_s"] is None and summary["sigterm_needs_s"] is None


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["replicate", "fsdp"])
def test_sigterm_to_torchrun_checkpoints_every_rank_and_resumes(sharding, tiny_factory, tmp_path):
    """SIGTERM to torchrun (what SLURM or Kubernetes sends): torchrun forwards it to both
    workers, which agree on the step, write one checkpoint and exit 143; torchrun then
    exits non-zero, and `--resume auto` under torchrun finishes the run. Replicated:
    a full checkpoint; sharded on FSDP2: a light one (no optimizer shard)."""
    from test_distributed import write_recipe

    recipe = write_recipe(
        tmp_path / "r.yaml",
        tiny_factory("llama", 4),
        tmp_path / "run",
        "grass",
        {"target": "disk", "residency": "step"},
        training={"max_steps": 400},
        distributed={"sharding": sharding},
        checkpoint={"on_signal": "full" if sharding == "replicate" else "light"},
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    cmd += ["-m", "grass_cli", "train", str(recipe), "--no-live"]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count('"event": "step"') >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err[-3000:]
    assert "Interrupted by SIGTERM" in err, err[-3000:]
    ckpt = find_latest(tmp_path / "run")
    manifest = verify(ckpt)
    assert manifest["world_size"] == 2 and 3 <= manifest["step"] < 400
    assert manifest["light"] is (sharding == "fsdp")
    step = manifest["step"]
    data = yaml.safe_load(recipe.read_text())
    data["training"]["max_steps"] = step + 2
    recipe.write_text(yaml.safe_dump(data))
    done = subprocess.run(
        [*cmd, "--resume", "auto"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("is a light checkpoint" in done.stdout) is (sharding == "fsdp")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == step + 2
