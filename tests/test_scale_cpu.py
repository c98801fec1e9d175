"""What scaling up needs, checked on the CPU with tiny random models: float16 training
is refused, sharded checkpoints resume exactly, a resume restores importance
exactly, and gradient checkpointing changes no gradient or MGN observation."""

from __future__ import annotations

import copy
import json
import shutil
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from test_checkpoint import TRAIN, make_recipe, run_interrupted, run_straight
from typer.testing import CliRunner

import grass_cli.checkpoint as ckpt
from grass_cli.cli import app
from grass_cli.engine import setup, train
from grass_cli.engine.saving import restore
from grass_cli.errors import GrassError, RecipeError
from grass_cli.models import load_model_and_tokenizer
from grass_cli.recipe import ModelConfig, load_recipe, validate_dict
from grass_cli.sampling.blocks import BlockMap, build_block_map
from grass_cli.sampling.importance import ImportanceTracker
from grass_cli.sampling.probing import forward_backward
from grass_cli.telemetry import Telemetry

runner = CliRunner()

# ------------------------------------------------------------------ 1. float16


FLOAT16_FIX = "use model.dtype: bfloat16, or model.dtype: float32 with training.autocast: bf16"


def test_float16_training_is_refused_with_one_clear_message(tmp_path):
    recipe = {
        "model": {"path": "some/model", "dtype": "float16"},
        "data": {"train": TRAIN},
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    res = runner.invoke(app, ["validate", str(path)])
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith(f"Error: {path}: invalid recipe (1 error):\n"), res.stderr
    assert "  - model.dtype is float16, but training in float16 needs loss scaling" in res.stderr
    assert "(small gradients underflow to zero)" in res.stderr
    assert FLOAT16_FIX in res.stderr
    assert "Traceback" not in res.output and res.stdout == ""

    # From an override, the message says so.
    recipe["model"]["dtype"] = "float32"
    path.write_text(yaml.safe_dump(recipe))
    res = runner.invoke(app, ["validate", str(path), "model.dtype=float16"])
    assert res.exit_code == 2
    assert f"{FLOAT16_FIX} (from a command-line override)" in res.stderr

    # The fixes the message names are valid recipes.
    # (`grass validate` would go on to check that some/model exists: test_preflight.py)
    for fix in (["model.dtype=bfloat16"], ["training.autocast=bf16"]):
        load_recipe(path, fix)


def test_float16_stays_allowed_where_a_model_is_only_evaluated():
    # `grass eval` and `inspect-importance` build ModelConfig on its own: only the
    # training Recipe refuses float16.
    assert ModelConfig(path="x", dtype="float16").dtype == "float16"
    with pytest.raises(RecipeError, match="model.dtype is float16"):
        validate_dict({"model": {"dtype": "float16"}, "data": {"train": TRAIN}}, "t.yaml")


# ------------------------------------------------------------ 2. sharded resume


def test_sharded_checkpoint_resumes_exactly(tiny_factory, tmp_path, monkeypatch):
    # The tiny model is ~6.4 MB (mostly the tied 49152 x 32 embedding) and a block
    # ~37 KB, so 100 KB shards give the embedding its own shard and a few more.
    monkeypatch.setattr(ckpt, "MODEL_SHARD_SIZE", "100KB")
    loads: list[tuple[str, list[weakref.ref]]] = []
    real_load = ckpt.load_file

    def tracked_load(file: Any, device: str = "cpu") -> dict[str, torch.Tensor]:
        # Every tensor of the shards read before must be gone: at most one shard
        # is in memory beside the model.
        for name, refs in loads:
            assert all(r() is None for r in refs), f"{name} still in memory"
        weights = real_load(file, device=device)
        loads.append((Path(file).name, [weakref.ref(t) for t in weights.values()]))
        return weights

    monkeypatch.setattr(ckpt, "load_file", tracked_load)
    model_dir = tiny_factory("llama", 4)
    a, ra = run_straight(make_recipe(model_dir, tmp_path / "a"))
    b, rb = run_interrupted(make_recipe(model_dir, tmp_path / "b"), k=3)

    # The checkpoint resumed from is sharded, and its manifest checksums every shard.
    path = tmp_path / "b/checkpoints/step-0000003"
    index = json.loads((path / ckpt.WEIGHTS_INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3, shards
    assert all(s.startswith("model-") and (path / s).is_file() for s in shards)
    assert not (path / ckpt.WEIGHTS_FILE).exists()
    manifest = ckpt.verify(path)
    assert {ckpt.WEIGHTS_INDEX, *shards} <= set(manifest["files"])
    # ... and the resume read each shard once, one at a time.
    assert [name for name, _ in loads] == shards

    # Exactly the uninterrupted run.
    assert rb.losses == ra.losses and len(ra.losses) == 7
    assert rb.eval_losses == ra.eval_losses
    pa = dict(a.model.named_parameters())
    for name, p in b.model.named_parameters():
        assert torch.equal(p, pa[name]), name

    # A missing shard: verify refuses the checkpoint, and restore on its own names it.
    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    (broken / shards[1]).unlink()
    with pytest.raises(GrassError, match=f"damaged checkpoint: {shards[1]} is missing"):
        ckpt.verify(broken)
    with pytest.raises(
        GrassError,
        match=f"damaged checkpoint: model shard {shards[1]} "
        rf"\(named in {ckpt.WEIGHTS_INDEX}\) is missing",
    ):
        ckpt.restore_weights(b.model, broken)
    # A shard that lost a tensor is refused, not half-loaded.
    shutil.copy(path / shards[1], broken / shards[1])
    weights = load_file(broken / shards[1])
    dropped = sorted(weights)[0]
    del weights[dropped]
    save_file(weights, broken / shards[1])
    with pytest.raises(GrassError, match=rf"do not fit this model \(missing \['{dropped}'\]"):
        ckpt.restore_weights(b.model, broken)


# ------------------------------------------------------- 3. importance restored


class Snapshot:
    """A sink that copies the importance and sampler state after step k, the state a
    checkpoint written after k steps holds."""

    def __init__(self, k: int):
        self.k = k
        self.run: Any = None
        self.state: dict[str, Any] = {}
        self.probe_mgn: list[float | None] = []

    def emit(self, event: dict[str, Any]) -> None:
        if event["event"] == "probe_done":
            self.probe_mgn = list(event["importance"])
        if event["event"] == "step" and event["step"] + 1 == self.k:
            self.state = importance_state(self.run)

    def close(self) -> None:
        pass


def importance_state(run: Any) -> dict[str, Any]:
    return copy.deepcopy(
        {
            "tracker": run.tracker.state_dict(),
            "probabilities": run.sampler.probabilities(),
            "sampler": run.sampler.state_dict(),
        }
    )


def assert_same_importance(got: dict[str, Any], want: dict[str, Any]) -> None:
    for key in ("mgn", "win_sum", "win_count"):
        g, w = got["tracker"][key], want["tracker"][key]
        # NaN (never observed) compares equal to NaN, nothing else is tolerated
        assert torch.equal(g.isnan(), w.isnan()), key
        assert torch.equal(g.nan_to_num(-1.0), w.nan_to_num(-1.0)), (key, g, w)
    assert got["probabilities"] == want["probabilities"]
    assert got["sampler"] == want["sampler"]


def test_resume_restores_importance_exactly(tiny_factory, tmp_path):
    model_dir = tiny_factory("llama", 4)
    # MGN is refreshed every 2 steps: the checkpoint after 3 steps holds a refreshed
    # MGN (not the probing one) and a window with step 2's observations in it.
    rec = make_recipe(model_dir, tmp_path / "run", checkpoint={"interval": 3, "keep_last": 5})
    snap = Snapshot(k=3)
    r = setup(rec, Telemetry([snap]), overwrite=True)
    snap.run = r
    straight = train(r)
    final = importance_state(r)

    want = snap.state
    mgn = want["tracker"]["mgn"]
    assert bool(torch.isfinite(mgn).all()), "probing gives every block an MGN"
    assert mgn.tolist() != snap.probe_mgn, "no refresh before the checkpoint"
    assert float(want["tracker"]["win_count"].sum()) > 0, "the window is empty"
    assert len(set(want["probabilities"])) > 1, "probabilities are uniform"

    # A fresh run restored from the checkpoint holds exactly that state ...
    r2 = setup(rec, Telemetry([]), resume=str(tmp_path / "run/checkpoints/step-0000003"))
    assert bool(r2.tracker.mgn.isnan().all())  # a fresh tracker knows nothing yet
    state = restore(r2, r2.resume_from)
    assert state.step == 3
    assert_same_importance(importance_state(r2), want)
    # ... and continues as the uninterrupted run did, to the same final state.
    resumed = train(r2)
    assert resumed.losses == straight.losses
    assert_same_importance(importance_state(r2), final)


# ---------------------------------------------------- 4. gradient checkpointing


def batches(vocab: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Two micro-batches (an accumulated step) with padding and a masked prompt."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(2):
        ids = torch.randint(0, vocab, (3, 24), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 17:] = 0  # right padding
        ids[1, 17:] = pad_id
        labels = ids.clone()
        labels[:, :6] = -100  # the prompt
        labels[mask == 0] = -100
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def step_grads(
    model_dir: Path, checkpointing: bool, trainable: set[str] | None
) -> tuple[dict[str, torch.Tensor | None], torch.Tensor, dict[int, bool]]:
    """One accumulated step with the tracker's hooks on, as the training loop runs it.

    Returns every parameter's gradient, the tracker's per-block MGN observations
    (NaN: not observed), and whether each block's output required grad (whether
    backward has to go through it). `trainable`: the groups that train (None: all).
    """
    model, tok, _ = load_model_and_tokenizer(
        ModelConfig(path=str(model_dir), dtype="float32", gradient_checkpointing=checkpointing)
    )
    model.train()
    on = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.2x
    if on is None:
        on = model.is_gradient_checkpointing
    assert bool(on) == checkpointing
    block_map: BlockMap = build_block_map(model)
    tracker = ImportanceTracker(block_map.blocks, alpha=0.5, device=torch.device("cpu"))
    for group in block_map.groups():  # after the tracker: hooks need requires_grad
        group.set_trainable(trainable is None or group.name in trainable)
    needs_grad: dict[int, bool] = {}
    blocks = model.model.layers
    for i, block in enumerate(blocks):

        def seen(module: Any, args: Any, out: Any, i: int = i) -> None:
            hidden = out[0] if isinstance(out, tuple) else out
            needs_grad[i] = hidden.requires_grad

        block.register_forward_hook(seen)
    forward_backward(model, tracker, batches(len(tok), tok.pad_token_id), torch.device("cpu"))
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    return grads, tracker.window_mean(), needs_grad


def assert_same_grads(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert (a[name] is None) == (b[name] is None), name
        if a[name] is not None:
            # Recomputation runs the same float32 CPU kernels on the same inputs.
            assert torch.equal(a[name], b[name]), name


def test_gradient_checkpointing_gives_the_same_gradients_and_mgn(tiny_factory):
    model_dir = tiny_factory("llama", 4)
    plain, mgn_plain, _ = step_grads(model_dir, False, None)
    ckpt_grads, mgn_ckpt, _ = step_grads(model_dir, True, None)
    assert all(g is not None for g in plain.values())
    assert_same_grads(plain, ckpt_grads)
    # (a) the tracker's hooks saw the same gradients: one observation per micro-batch
    assert bool(torch.isfinite(mgn_plain).all())
    assert torch.equal(mgn_plain, mgn_ckpt)


def test_gradient_checkpointing_with_only_a_middle_block_trainable(tiny_factory):
    # (b) embeddings, norm and head frozen, block 2 of 4 trains: backward starts at
    # the head and stops at block 2, with or without checkpointing.
    model_dir = tiny_factory("llama", 4)
    plain, mgn_plain, needs_plain = step_grads(model_dir, False, {"block.2"})
    ckpt_grads, mgn_ckpt, needs_ckpt = step_grads(model_dir, True, {"block.2"})
    assert_same_grads(plain, ckpt_grads)
    for name, g in ckpt_grads.items():
        in_block_2 = name.startswith("model.layers.2.")
        assert (g is not None) == in_block_2, name
    assert torch.equal(mgn_plain.isnan(), torch.tensor([True, True, False, True]))
    assert torch.equal(mgn_plain.nan_to_num(-1.0), mgn_ckpt.nan_to_num(-1.0))
    # Blocks 0 and 1 are not part of backward at all (before the fix in
    # models.enable_gradient_checkpointing, checkpointing made the embedding output
    # require grad, so backward recomputed and went through both).
    assert needs_plain == {0: False, 1: False, 2: True, 3: True}
    assert needs_ckpt == needs_plain
