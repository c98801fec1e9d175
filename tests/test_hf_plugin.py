"""The Hugging Face Trainer plug-in (grass_cli.integrations.hf): on the same batches,
seed, lr and clipping a Trainer with GrassCallback trains the model `grass train`
trains (same blocks at every step, same weights at the end); a Trainer resumed from
its checkpoint ends where a straight run does; offloading moves the state; the logs
carry the blocks and their MGN; TRL's SFTTrainer trains with it; LISA is one argument."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import ListSink, layerwise_recipe
from torch.utils.data import SequentialSampler
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

from grass_cli.engine import setup, train
from grass_cli.integrations.hf import GrassCallback
from grass_cli.telemetry import Telemetry

ROOT = Path(__file__).resolve().parent.parent
STEPS, PROBE = 8, 2


def recipe(model_dir: Path, out: Path):
    return layerwise_recipe(model_dir, out, STEPS, PROBE, lr_scheduler="constant", warmup_steps=0)


class InOrder(Trainer):
    """The batches in the order given (the engine's), one prepared batch per step."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset or self.train_dataset)


def trainer_for(model, batches, out: Path, seed: int, **args) -> Trainer:
    targs = TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=1,
        learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=1.0, seed=seed, report_to="none", logging_steps=1,
        use_cpu=True, dataloader_num_workers=0, **{"save_strategy": "no", **args},
    )  # fmt: skip
    return InOrder(
        model=model, args=targs, train_dataset=batches, data_collator=lambda items: items[0]
    )


@pytest.fixture
def engine_run(tiny_factory, tmp_path):
    """`grass train`'s engine on a tiny model: its batches (probing's first), the blocks
    of every step and its final weights."""
    model_dir = tiny_factory("llama", 6)
    rec = recipe(model_dir, tmp_path / "run")
    run = setup(rec, Telemetry([]), overwrite=True)
    batches = [next(run.batches) for _ in range(PROBE + STEPS)]
    run.grass.close()
    sink = ListSink()
    run = setup(rec, Telemetry([sink]), overwrite=True)
    train(run)
    active = [e["active"] for e in sink.of("step")]
    weights = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
    losses = [e["loss"] for e in sink.of("step")]
    return model_dir, rec, batches, active, weights, losses


class Recorder(TrainerCallback):
    """A reporting callback after GRASS's (as W&B's or TensorBoard's would be): the
    logs it is handed."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs is not None and "loss" in logs:
            self.logs.append(dict(logs))


def active_from_logs(logs: list[dict], blocks: int) -> list[list[int]]:
    steps = [h for h in logs if "grass/active_blocks" in h and "loss" in h]
    return [[i for i in range(blocks) if h[f"grass/active/{i}"] == 1.0] for h in steps]


def test_trainer_with_the_plugin_trains_what_grass_train_trains(engine_run, tmp_path):
    model_dir, rec, batches, engine_active, engine_weights, engine_losses = engine_run
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    trainer = trainer_for(model, batches[PROBE:], tmp_path / "hf", seed=rec.training.seed + 1)
    cb = GrassCallback(rec.sampler, rec.optimizer, probe_data=batches[:PROBE]).attach(trainer)
    assert trainer.callback_handler.callbacks[0] is cb  # first: loggers see its scalars
    seen = Recorder()
    trainer.add_callback(seen)  # (registered after GRASS's, as a reporter is)
    trainer.train()
    assert active_from_logs(seen.logs, 6) == engine_active
    assert active_from_logs(trainer.state.log_history, 6) == engine_active
    assert len({tuple(a) for a in engine_active}) > 1
    losses = [h["loss"] for h in seen.logs]  # (the Trainer logs each step's loss, unrounded)
    assert losses == pytest.approx(engine_losses, rel=1e-5)
    for name, w in model.state_dict().items():
        torch.testing.assert_close(w, engine_weights[name], rtol=1e-5, atol=1e-6, msg=name)
    mgn = [h for h in seen.logs if "grass/mgn/0" in h]
    assert len(mgn) == STEPS and all(h["grass/mgn/0"] > 0 for h in mgn)


def test_a_resumed_trainer_ends_where_a_straight_one_does(engine_run, tmp_path):
    model_dir, rec, batches, *_ = engine_run
    seed = rec.training.seed + 1

    def run(out: Path, resume: str | None = None):
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        t = trainer_for(model, batches[PROBE:], out, seed, save_strategy="steps", save_steps=3)
        GrassCallback(rec.sampler, rec.optimizer, probe_data=batches[:PROBE]).attach(t)
        t.train(resume_from_checkpoint=resume)
        return model, t

    straight, t1 = run(tmp_path / "a")
    ckpt = tmp_path / "a" / "checkpoint-3"
    assert sorted(p.name for p in (ckpt / "grass").iterdir()) == [
        "grass.json", "grass.safetensors", "optimizer"
    ]  # fmt: skip
    # no pickle of ours: the Trainer's optimizer.pt keeps the lr only
    assert (ckpt / "optimizer.pt").stat().st_size < 2000
    resumed, t2 = run(tmp_path / "a", resume=str(ckpt))
    for name, w in straight.state_dict().items():
        assert torch.equal(w, resumed.state_dict()[name]), name
    # the resumed history: the checkpoint's 3 steps, then its own 5, as the straight run's
    assert active_from_logs(t2.state.log_history, 6) == active_from_logs(t1.state.log_history, 6)


def test_resuming_without_grass_state_is_one_clear_error(engine_run, tmp_path):
    model_dir, rec, batches, *_ = engine_run
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    t = trainer_for(model, batches[PROBE:], tmp_path / "b", 4, save_strategy="steps", save_steps=3)
    t.train()  # a plain Trainer run: its checkpoint has no grass/
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    t = trainer_for(model, batches[PROBE:], tmp_path / "b", 4)
    GrassCallback(rec.sampler, rec.optimizer, probe_data=batches[:PROBE]).attach(t)
    with pytest.raises(FileNotFoundError, match="holds no GRASS state"):
        t.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-3"))


def test_lisa_is_one_argument_and_offloads(engine_run, tmp_path):
    model_dir, rec, batches, *_ = engine_run
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    t = trainer_for(model, batches[PROBE:], tmp_path / "l", 5)
    cb = GrassCallback({"strategy": "lisa", "gamma": 2, "switch_interval": 3},
                       {"state_policy": "offload"}).attach(t)  # fmt: skip

    class Resting(TrainerCallback):
        """At each step's end: the state bytes in the store, and on the device for
        the groups resting in it."""

        seen: list[tuple[int, int]] = []

        def on_step_end(self, args, state, control, **kw):
            opt = cb.grass.optimizer
            live = sum(
                t.numel() for n in opt.stored_groups() for t in opt.states[n].state_tensors()
            )
            self.seen.append((opt.memory()["optimizer_state_offload_cpu_bytes"], live))

    t.add_callback(Resting())
    t.train()
    sets = active_from_logs(t.state.log_history, 6)
    assert all(len(s) == 2 for s in sets) and len({tuple(s) for s in sets}) > 1
    assert not any("grass/mgn/0" in h for h in t.state.log_history)  # LISA: no probing
    # after the first switch the blocks trained before rest in the store, off the device
    assert Resting.seen[0][0] == 0
    assert all(stored > 0 and live == 0 for stored, live in Resting.seen[3:])


def test_attach_refuses_a_trainer_that_has_an_optimizer(engine_run, tmp_path):
    model_dir, _, batches, *_ = engine_run
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    t = trainer_for(model, batches, tmp_path / "o", 0)
    t.create_optimizer()
    with pytest.raises(ValueError, match="already has an optimizer"):
        GrassCallback().attach(t)


def test_trl_sft_trainer_trains_with_the_plugin(tiny_factory, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model_dir = tiny_factory("llama", 6)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    rows = [
        {"prompt": f"{a} + {b} =", "completion": f" {a + b}"} for a in range(8) for b in range(8)
    ]
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"), max_steps=6, per_device_train_batch_size=4,
        learning_rate=1e-3, report_to="none", logging_steps=1, save_strategy="no",
        use_cpu=True, max_length=32,
    )  # fmt: skip
    t = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    GrassCallback({"gamma": 2, "switch_interval": 2, "probe_steps": 2}).attach(t)
    t.train()
    sets = active_from_logs(t.state.log_history, 6)
    assert len(sets) == 6 and all(len(s) == 2 for s in sets)
    changed = {k.split(".")[2] for k, v in model.state_dict().items()
               if k.startswith("model.layers.") and not torch.equal(v, before[k])}  # fmt: skip
    assert changed == {str(i) for s in sets for i in s}  # only drawn blocks moved


def test_the_trainer_example_runs(tiny_factory, tmp_path):
    """examples/trainer.py, as docs/python-api.md shows it: trains, and its checkpoint
    holds GRASS's state beside the Trainer's files."""
    import subprocess
    import sys

    out = tmp_path / "ex"
    subprocess.run(
        [sys.executable, str(ROOT / "examples/trainer.py"), str(tiny_factory("llama", 6)),
         "--steps", "10", "--out", str(out)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert (out / "checkpoint-10" / "grass" / "grass.json").exists()
    assert (out / "checkpoint-10" / "model.safetensors").exists()
