"""The public Python API (grass_cli.Grass): a plain loop with it trains, `grass train`'s
engine is the same objects (same blocks at every switch, same losses on the same
batches), offloading moves the state off the device, a saved state resumes exactly,
and what a user gets wrong is one clear error."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ListSink, layerwise_recipe
from transformers import AutoModelForCausalLM

from grass_cli import Grass
from grass_cli.engine import setup, train
from grass_cli.engine.schedule import lr_at
from grass_cli.telemetry import Telemetry

ROOT = Path(__file__).resolve().parent.parent


def recipe(model_dir: Path, out: Path):
    return layerwise_recipe(model_dir, out, 9)


def batches_of(rec, n: int) -> list[dict[str, torch.Tensor]]:
    """The first n batches the engine draws for this recipe (probing, then training)."""
    run = setup(rec, Telemetry([]), overwrite=True)
    try:
        return [next(run.batches) for _ in range(n)]
    finally:
        run.grass.close()


def plain_loop(model_dir: Path, rec, batches, steps: range, grass=None, model=None):
    """What a user writes with the API: probe, then begin_step / backward / clip /
    step; returns (Grass, model, losses, active set per step)."""
    s, tc = rec.sampler, rec.training
    if grass is None:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        grass = Grass(model, s, rec.optimizer, seed=tc.seed + 1)
        grass.probe(batches[: s.probe_steps])
    losses, active = [], []
    for step in steps:
        grass.begin_step(step)
        loss = model(**batches[s.probe_steps + step]).loss
        grass.backward(loss)
        torch.nn.utils.clip_grad_norm_(grass.trainable_params(), tc.grad_clip)
        grass.step(lr_at(step, tc.max_steps, rec.optimizer.lr, tc))
        grass.zero_grad()
        losses.append(loss.item())
        active.append(grass.active)
    return grass, model, losses, active


def test_grass_train_is_built_on_the_api(tiny_factory, tmp_path):
    """The engine and a plain loop over the same batches draw the same blocks at
    every switch and see the same losses."""
    model_dir = tiny_factory("llama", 6)
    rec = recipe(model_dir, tmp_path / "run")
    batches = batches_of(rec, rec.sampler.probe_steps + rec.training.max_steps)
    sink = ListSink()
    run = setup(rec, Telemetry([sink]), overwrite=True)
    train(run)
    engine_active = [e["active"] for e in sink.of("step")]
    engine_losses = [e["loss"] for e in sink.of("step")]
    grass, _, losses, active = plain_loop(model_dir, rec, batches, range(9))
    grass.close()
    assert active == engine_active
    assert len({tuple(a) for a in active}) > 1  # the sampler switched
    assert losses == pytest.approx(engine_losses, rel=1e-5)
    probe = sink.of("probe_done")[0]["importance"]
    assert len(probe) == 6


def test_offloaded_state_leaves_the_device_and_a_saved_state_resumes_exactly(
    tiny_factory, tmp_path
):
    model_dir = tiny_factory("llama", 6)
    rec = recipe(model_dir, tmp_path / "run")
    batches = batches_of(rec, rec.sampler.probe_steps + rec.training.max_steps)
    _, _, straight, straight_active = plain_loop(model_dir, rec, batches, range(9))

    grass, model, first, _ = plain_loop(model_dir, rec, batches, range(4))
    # blocks trained in the first interval and now frozen: their state is in the store
    mem = grass.optimizer.memory()
    assert mem["optimizer_state_offload_cpu_bytes"] > 0
    resting = grass.optimizer.stored_groups()
    assert resting and not resting & {f"block.{i}" for i in grass.active}
    on_device = sum(t.numel() for n in resting for t in grass.optimizer.states[n].state_tensors())
    assert on_device == 0
    saved = grass.save(tmp_path / "state")
    assert sorted(p.name for p in saved.iterdir()) == [
        "grass.json",
        "grass.safetensors",
        "optimizer",
    ]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    grass.close()

    model2 = AutoModelForCausalLM.from_pretrained(model_dir)
    model2.load_state_dict(weights)
    grass2 = Grass(model2, rec.sampler, rec.optimizer, seed=rec.training.seed + 1)
    grass2.load(saved)
    _, _, rest, rest_active = plain_loop(
        model_dir, rec, batches, range(4, 9), grass=grass2, model=model2
    )
    grass2.close()
    assert first + rest == straight  # bit for bit
    assert rest_active == straight_active[4:]


def test_save_never_replaces_a_folder_it_did_not_write(tiny_factory, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_factory("llama", 4))
    grass = Grass(model, {"gamma": 1})
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a GRASS state folder"):
        grass.save(mine)
    assert (mine / "notes.txt").read_text() == "keep"
    grass.save(tmp_path / "s")
    grass.save(tmp_path / "s")  # its own save: replaced
    grass.close()


@pytest.mark.parametrize(
    ("sampler", "optimizer", "message"),
    [
        ({"strategy": "lora"}, {}, "wrap the model with peft"),
        ({"gamma": "auto"}, {}, "give a number of blocks"),
        ({"gamma": 9}, {}, "gamma 9 is more than the model's 4 blocks"),
        ({}, {"state_policy": "offload", "offload": {"target": "disk"}}, "needs state_dir"),
        ({"gamma": 0}, {}, "gamma"),
    ],
)
def test_what_a_user_gets_wrong_is_one_error(tiny_factory, sampler, optimizer, message):
    model = AutoModelForCausalLM.from_pretrained(tiny_factory("llama", 4))
    with pytest.raises(ValueError, match=message):
        Grass(model, sampler, optimizer)


def test_the_plain_loop_example_runs(tiny_factory):
    """examples/plain_loop.py, as docs/python-api.md shows it: the loss falls and the
    blocks switch every 5 steps."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples/plain_loop.py"), str(tiny_factory("llama", 4)),
         "--steps", "15", "--lr", "3e-3"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert [r["step"] for r in rows] == list(range(15))
    assert sum(r["loss"] for r in rows[-3:]) < sum(r["loss"] for r in rows[:3])
    sets = [tuple(r["active"]) for r in rows]
    assert all(len(s) == 2 for s in sets)
    assert all(sets[i] == sets[i - 1] for i in range(1, 15) if i % 5)


def test_importing_grass_cli_stays_cheap():
    code = "import sys, grass_cli; assert 'torch' not in sys.modules; print(grass_cli.__all__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "Grass" in out.stdout


def test_save_leaves_no_temporary_and_keeps_a_users_lookalike(tiny_factory, tmp_path):
    """A folder named like our temporary (`state.tmp`) is the user's: never touched;
    replacing a save leaves only the new one."""
    model = AutoModelForCausalLM.from_pretrained(tiny_factory("llama", 4))
    grass = Grass(model, {"gamma": 1})
    theirs = tmp_path / "state.tmp"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("mine")
    grass.save(tmp_path / "state")
    grass.save(tmp_path / "state")
    grass.close()
    assert (theirs / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state", "state.tmp"]
