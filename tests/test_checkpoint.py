"""Checkpoints, exact resume, interruption, damage detection, non-finite guard."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from grass_cli.checkpoint import find_latest, verify
from grass_cli.engine import Interrupted, NonFiniteError, StopRequest, setup, train
from grass_cli.errors import GrassError
from grass_cli.recipe import validate_dict
from grass_cli.telemetry import Telemetry

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "data/quickstart/train.jsonl")
EVAL = str(ROOT / "data/quickstart/eval.jsonl")

COMBOS = {
    # name: (strategy, optimizer section)
    "full-keep": ("full", {"state_policy": "keep"}),
    "lisa-drop": ("lisa", {"state_policy": "drop"}),
    "lisa-offload-cpu-step": (
        "lisa",
        {"state_policy": "offload", "offload": {"target": "cpu", "residency": "step"}},
    ),
    "grass-keep": ("grass", {"state_policy": "keep"}),
    "grass-drop": ("grass", {"state_policy": "drop"}),
    "grass-offload-disk": ("grass", {"state_policy": "offload", "offload": {"target": "disk"}}),
}


def make_recipe(
    model_dir: Path, out: Path, strategy: str = "grass", optimizer: dict | None = None, **sections
):
    data = {
        "model": {"path": str(model_dir)},
        "data": {"train": TRAIN, "eval": EVAL, "max_length": 64, "limit": 40, "eval_limit": 8},
        "sampler": {
            "strategy": strategy,
            "gamma": 2,
            "switch_interval": 2,
            "probe_steps": 2,
            "update_interval": 2,
        },
        # dropout on: the torch RNG must be restored too for an exact resume
        "optimizer": {"lr": 1e-3, "weight_decay": 0.01, **(optimizer or {})},
        "training": {"max_steps": 7, "micro_batch_size": 4, "seed": 5, "eval_interval": 3},
        "output": {"dir": str(out), "save_model": False},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return validate_dict(data, "test.yaml")


class StopAfter:
    """A sink that asks the loop to stop after step k (as a SIGINT handler would)."""

    def __init__(self, k: int, stop: StopRequest):
        self.k, self.stop = k, stop

    def emit(self, event):
        if event["event"] == "step" and event["step"] + 1 == self.k:
            self.stop.requested = "SIGINT"

    def close(self):
        pass


def run_straight(recipe):
    r = setup(recipe, Telemetry([]), overwrite=True)
    try:
        result = train(r)
    finally:
        if r.optimizer.store:
            r.optimizer.store.close()
    return r, result


def run_interrupted(recipe, k: int):
    stop = StopRequest()
    r = setup(recipe, Telemetry([StopAfter(k, stop)]), overwrite=True)
    with pytest.raises(Interrupted) as exc:
        train(r, stop)
    if r.optimizer.store:
        r.optimizer.store.close(keep=True)
    assert exc.value.step == k and exc.value.checkpoint.name == f"step-{k:07d}"
    r2 = setup(recipe, Telemetry([]), resume="auto")
    try:
        result = train(r2)
    finally:
        if r2.optimizer.store:
            r2.optimizer.store.close()
    return r2, result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("combo", list(COMBOS))
def test_resume_is_bit_identical(combo, tiny_factory, tmp_path):
    strategy, opt = COMBOS[combo]
    model_dir = tiny_factory("gpt2", 4)  # GPT-2 has dropout: RNG state matters
    a, ra = run_straight(make_recipe(model_dir, tmp_path / "a", strategy, opt))
    b, rb = run_interrupted(make_recipe(model_dir, tmp_path / "b", strategy, opt), k=3)
    assert rb.losses == ra.losses and len(ra.losses) == 7
    assert rb.eval_losses == ra.eval_losses
    pa = dict(a.model.named_parameters())
    for name, p in b.model.named_parameters():
        assert torch.equal(p, pa[name]), name
    # metrics.jsonl of the resumed run has each step exactly once, in order
    steps = [e["step"] for e in metrics(tmp_path / "b") if e["event"] == "step"]
    assert steps == list(range(7))
    assert [e["loss"] for e in metrics(tmp_path / "b") if e["event"] == "step"] == ra.losses


def grass_resumed_as_straight(tiny_factory, tmp_path: Path, sampler: dict):
    """A GRASS run straight through (tmp_path/a) and one interrupted after step 3 and
    resumed (tmp_path/b), with these sampler keys: the same losses and weights, bit
    for bit. Returns both runs."""
    model_dir = tiny_factory("gpt2", 4)
    opt = {"state_policy": "keep"}
    a, ra = run_straight(make_recipe(model_dir, tmp_path / "a", "grass", opt, sampler=sampler))
    b, rb = run_interrupted(
        make_recipe(model_dir, tmp_path / "b", "grass", opt, sampler=sampler), k=3
    )
    assert rb.losses == ra.losses and len(ra.losses) == 7
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        assert torch.equal(p, q), name
    return a, b


def test_resume_with_lr_correction_is_bit_identical_and_steps_scaled(tiny_factory, tmp_path):
    """sampler.lr_correction: each drawn block steps at lr x its scale (read back from
    the optimizer), the switch events log the scales, and a resume in the middle of
    a switch interval continues with the same scales, bit for bit."""
    sampler = {"lr_correction": "inverse_probability", "tau": 0.2, "eps": 0.0}
    a, _ = grass_resumed_as_straight(tiny_factory, tmp_path, sampler)
    switches = [e for e in metrics(tmp_path / "a") if e["event"] == "switch"]
    assert switches and all(len(e["lr_scales"]) == len(e["active"]) for e in switches)
    assert any(abs(v - 1.0) > 1e-3 for e in switches for v in e["lr_scales"])
    from grass_cli.engine.schedule import lr_at

    last_lr = lr_at(6, 7, 1e-3, a.recipe.training)  # the last step's scheduled lr
    last = switches[-1]
    for i, scale in zip(last["active"], last["lr_scales"], strict=True):
        for group in a.optimizer.states[f"block.{i}"].optimizer.param_groups:
            assert group["lr"] == pytest.approx(last_lr * scale, rel=1e-12)


def test_resume_with_balanced_draws_is_bit_identical(tiny_factory, tmp_path):
    """sampler.draw: balanced keeps each block's credit in the checkpoint: a run
    interrupted mid-interval draws the same sets after resuming as one that was not."""
    a, b = grass_resumed_as_straight(tiny_factory, tmp_path, {"draw": "balanced", "tau": 0.2})
    sets = [[e["active"] for e in metrics(tmp_path / d) if e["event"] == "switch"] for d in "ab"]
    assert len(sets[0]) == 4 and sets[1][-2:] == sets[0][-2:]
    assert a.sampler.credit.tolist() == b.sampler.credit.tolist()


def test_checkpoint_contents_manifest_and_keep_last(tiny_llama, tmp_path):
    rec = make_recipe(tiny_llama, tmp_path / "run", checkpoint={"interval": 2, "keep_last": 2})
    run_straight(rec)
    root = tmp_path / "run/checkpoints"
    assert sorted(p.name for p in root.glob("step-*")) == ["step-0000006", "step-0000007"]
    assert (root / "latest").read_text().strip() == "step-0000007"
    latest = find_latest(tmp_path / "run")
    manifest = verify(latest)
    assert manifest["step"] == 7
    assert manifest["format"] == 2
    assert {
        "model.safetensors",
        "config.json",
        "optimizer/index.json",
        "state.json",
        "state.safetensors",
        "tokenizer.json",
    } <= set(manifest["files"])
    # no pickle anywhere: JSON and safetensors only
    assert not [f for f in manifest["files"] if f.endswith((".pt", ".bin", ".pkl"))]
    # one optimizer file pair per group that has state, as the index lists them
    groups = json.loads((latest / "optimizer/index.json").read_text())["groups"]
    assert groups and all(
        f"optimizer/{n}.json" in manifest["files"]
        and f"optimizer/{n}.safetensors" in manifest["files"]
        for n in groups
    )
    # a checkpoint folder is a loadable HF model
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(latest).config.num_hidden_layers == 4


def test_damaged_checkpoint_is_refused(tiny_llama, tmp_path):
    rec = make_recipe(tiny_llama, tmp_path / "run", training={"max_steps": 2})
    run_straight(rec)
    ckpt = find_latest(tmp_path / "run")
    with open(ckpt / "state.safetensors", "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    with pytest.raises(
        GrassError,
        match="damaged checkpoint: state.safetensors is missing or does not match its checksum",
    ):
        setup(rec, Telemetry([]), resume=str(ckpt))


def test_resume_refuses_structural_changes_and_other_run_dirs(tiny_llama, tmp_path):
    rec = make_recipe(tiny_llama, tmp_path / "run", training={"max_steps": 2})
    run_straight(rec)
    other = make_recipe(tiny_llama, tmp_path / "run", training={"max_steps": 2, "seed": 9})
    with pytest.raises(
        GrassError,
        match="already holds a run of a different recipe "
        r"\(training.seed differ\)",
    ):
        setup(other, Telemetry([]))
    with pytest.raises(GrassError, match="cannot resume with a recipe that changes training.seed"):
        setup(other, Telemetry([]), resume="auto")
    with pytest.raises(GrassError, match="already holds a run$|already holds a run\n"):
        setup(rec, Telemetry([]))
    # Extending max_steps is allowed: the recipe given now wins.
    longer = make_recipe(tiny_llama, tmp_path / "run", training={"max_steps": 4})
    r = setup(longer, Telemetry([]), resume="auto")
    assert len(train(r).losses) == 4


def test_nonfinite_skip_and_stop(tiny_llama, tmp_path, monkeypatch):
    import grass_cli.engine.step as engine

    real = engine.forward_backward
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return float("nan") if calls["n"] == 2 else loss  # the training loop's 2nd step

    monkeypatch.setattr(engine, "forward_backward", poisoned)
    rec = make_recipe(tiny_llama, tmp_path / "skip", training={"nonfinite": "skip"})
    r, result = run_straight(rec)
    events = metrics(tmp_path / "skip")
    assert [e["skipped"] for e in events if e["event"] == "step"] == [
        False,
        True,
        False,
        False,
        False,
        False,
        False,
    ]
    assert any(e["event"] == "warning" and "step skipped" in e["message"] for e in events)
    assert json.loads((tmp_path / "skip/summary.json").read_text())["skipped_steps"] == 1

    calls["n"] = 0
    rec = make_recipe(tiny_llama, tmp_path / "stop", training={"nonfinite": "stop"})
    with pytest.raises(
        NonFiniteError, match="non-finite loss at step 1; the last good state is saved in"
    ):
        run_straight(rec)
    assert verify(find_latest(tmp_path / "stop"))["step"] == 1


FSIZE_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from grass_cli.cli import main
sys.argv = ["grass", "train", sys.argv[1], "--no-live", "--quiet", *sys.argv[3:]]
main()
"""


def _train_with_file_limit(recipe_file: Path, limit: int, *args: str):
    return subprocess.run(
        [sys.executable, "-c", FSIZE_LIMITED, str(recipe_file), str(limit), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )


def test_write_limit_keeps_previous_checkpoint(tiny_llama, tmp_path):
    """A real write limit (RLIMIT_FSIZE): every write past it fails in the kernel, as a
    full disk does. The first checkpoint fits; the model file of the next does not,
    once the limit is lowered below it: one message, no traceback, no temporary
    folder left, the previous checkpoint intact and resumable."""
    rec = make_recipe(tiny_llama, tmp_path / "run", checkpoint={"interval": 2})
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(rec.to_yaml())
    straight = _train_with_file_limit(recipe_file, 1 << 30, "training.max_steps=2")
    assert straight.returncode == 0, straight.stderr
    weights = (tmp_path / "run/checkpoints/step-0000002/model.safetensors").stat().st_size
    res = _train_with_file_limit(recipe_file, weights // 2, "--resume", "auto")
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    assert "file size limit reached while writing checkpoint step-0000004" in res.stderr
    assert "the previous checkpoint" in res.stderr and "step-0000002 is intact" in res.stderr
    root = tmp_path / "run/checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-0000002"]
    verify(root / "step-0000002")
    r = setup(rec, Telemetry([]), resume="auto")
    assert len(train(r).losses) == 7


def test_write_limit_on_the_final_model_says_what_was_kept(tiny_llama, tmp_path):
    rec = make_recipe(
        tiny_llama,
        tmp_path / "run",
        training={"max_steps": 2},
        output={"save_model": True},
        checkpoint={"at_end": False},
    )
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(rec.to_yaml())
    weights = (tiny_llama / "model.safetensors").stat().st_size
    res = _train_with_file_limit(recipe_file, weights // 2)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert "file size limit reached while saving the trained model" in res.stderr
    assert "no checkpoint holds them: the trained weights are lost" in res.stderr
    assert not (tmp_path / "run/.final.tmp").exists()
    assert not (tmp_path / "run/final").exists()


SLOW_SAVE = """
import sys, time
import grass_cli.checkpoint as ck
real = ck.save_tree
count = {"n": 0}
def slow(path, obj):
    if path.name == "state":
        count["n"] += 1
        if count["n"] == 2:       # second checkpoint: optimizer/ written, state not yet
            print("WRITING", flush=True)
            time.sleep(60)
    return real(path, obj)
ck.save_tree = slow
from grass_cli.cli import main
sys.argv = ["grass", "train", sys.argv[1], "--no-live", "--quiet"]
main()
"""


def test_sigkill_while_writing_checkpoint_leaves_previous_valid(tiny_llama, tmp_path):
    rec = make_recipe(tiny_llama, tmp_path / "run", checkpoint={"interval": 2})
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(rec.to_yaml())
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_SAVE, str(recipe_file)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    deadline = time.time() + 120
    line = ""
    while time.time() < deadline and "WRITING" not in line:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            break
    assert "WRITING" in line, "the child never reached the second checkpoint"
    root = tmp_path / "run/checkpoints"
    assert (root / ".tmp-step-0000004").is_dir()  # killed mid-write
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert find_latest(tmp_path / "run").name == "step-0000002"
    verify(root / "step-0000002")
    r = setup(rec, Telemetry([]), resume="auto")
    result = train(r)
    _, straight = run_straight(
        make_recipe(tiny_llama, tmp_path / "straight", checkpoint={"interval": 2})
    )
    assert result.losses == straight.losses
    assert not (root / ".tmp-step-0000004").exists()


def _spawn_train(recipe_file: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "grass_cli", "train", str(recipe_file), "--no-live"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def _wait_for_step(proc: subprocess.Popen, step: int) -> None:
    deadline = time.time() + 180
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith(f"step {step:>5}/"):
            return
        if not line and proc.poll() is not None:
            break
    raise AssertionError("training never reached the step")


def test_sigterm_checkpoints_and_exits_143_then_resumes(tiny_llama, tmp_path):
    rec = make_recipe(tiny_llama, tmp_path / "run", training={"max_steps": 200})
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(rec.to_yaml())
    proc = _spawn_train(recipe_file)
    _wait_for_step(proc, 2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM: finishing this step and saving a checkpoint" in err
    assert f"Resume with: grass train {recipe_file} --resume auto" in err
    ckpt = find_latest(tmp_path / "run")
    step = verify(ckpt)["step"]
    assert 2 <= step < 200
    shorter = make_recipe(tiny_llama, tmp_path / "run", training={"max_steps": step + 2})
    r = setup(shorter, Telemetry([]), resume="auto")
    assert len(train(r).losses) == step + 2


def test_second_sigint_aborts_at_once_without_damage(tiny_llama, tmp_path):
    rec = make_recipe(
        tiny_llama, tmp_path / "run", training={"max_steps": 200}, checkpoint={"interval": 1}
    )
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(rec.to_yaml())
    proc = _spawn_train(recipe_file)
    _wait_for_step(proc, 3)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    verify(find_latest(tmp_path / "run"))  # the newest complete checkpoint is intact
