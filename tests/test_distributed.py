"""Data-parallel training: 2 gloo processes under torchrun on the CPU.

The 2-process runs go through the real CLI (`python -m torch.distributed.run
--standalone --nproc-per-node 2 -m grass_cli train ...`); the single-process runs
they are compared with use the same recipe with twice the micro batch (the same
global batch), so every step sees the same rows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from grass_cli.data import BatchIterator
from grass_cli.engine import run_training, setup
from grass_cli.errors import GrassError
from grass_cli.recipe import load_recipe
from grass_cli.telemetry import Telemetry

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "data/quickstart/train.jsonl")
EVAL = str(ROOT / "data/quickstart/eval.jsonl")
STEPS = 6

pytestmark = pytest.mark.slow

POLICIES = {
    "lisa-offload-cpu": ("lisa", {"target": "cpu", "residency": "interval"}),
    "grass-offload-disk": ("grass", {"target": "disk", "residency": "step"}),
}


def write_recipe(
    path: Path,
    model_dir: Path,
    out: Path,
    strategy: str,
    offload: dict,
    policy: str = "offload",
    **sections: dict,
) -> Path:
    """The distributed tests' recipe (tests/test_sharded.py's too); `sections` are
    merged into the recipe's sections, e.g. distributed={"sharding": "fsdp"}."""
    recipe = {
        "model": {"path": str(model_dir)},
        "data": {"train": TRAIN, "eval": EVAL, "max_length": 64, "limit": 48, "eval_limit": 6},
        "sampler": {
            "strategy": strategy,
            "gamma": 2,
            "switch_interval": 2,
            "probe_steps": 2,
            "update_interval": 2,
        },
        "optimizer": {
            "lr": 2e-3,
            "weight_decay": 0.01,
            "state_policy": policy,
            **({"offload": offload} if offload else {}),
        },
        # constant lr: a run resumed with a larger max_steps follows the same curve
        "training": {
            "max_steps": STEPS,
            "micro_batch_size": 2,
            "seed": 3,
            "lr_scheduler": "constant",
            "eval_interval": 3,
        },
        "checkpoint": {"at_end": True},
        "output": {"dir": str(out), "save_model": True},
    }
    for name, values in sections.items():
        recipe[name] = {**recipe.get(name, {}), **values}
    path.write_text(yaml.safe_dump(recipe))
    return path


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def train_dp(recipe: Path, *extra: str, script: bool = False) -> subprocess.CompletedProcess:
    """2 processes through `-m grass_cli`, or through the installed `grass` script."""
    entry = [str(Path(sys.executable).with_name("grass"))] if script else ["-m", "grass_cli"]
    proc = torchrun(*entry, "train", str(recipe), "--no-live", *extra)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def events(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["event"] == kind]


@pytest.fixture(scope="module")
def dp_runs(tiny_factory, tmp_path_factory):
    """Each policy trained once with 2 processes (shared by the tests below)."""
    model_dir = tiny_factory("llama", 4)
    root = tmp_path_factory.mktemp("dp")
    runs = {}
    for name, (strategy, offload) in POLICIES.items():
        recipe = write_recipe(root / f"{name}.yaml", model_dir, root / name, strategy, offload)
        proc = train_dp(recipe)
        runs[name] = (recipe, root / name, proc)
    return model_dir, root, runs


@pytest.mark.parametrize("name", list(POLICIES))
def test_two_processes_match_one_with_the_same_global_batch(name, dp_runs, tmp_path):
    _, _, runs = dp_runs
    recipe, dp_dir, proc = runs[name]
    single = load_recipe(
        recipe, [f"output.dir={tmp_path / 'single'}", "training.micro_batch_size=4"]
    )
    result = run_training(single, Telemetry([]), overwrite=True)

    dp_steps, one_steps = events(dp_dir, "step"), events(result.run_dir, "step")
    assert [e["active"] for e in dp_steps] == [e["active"] for e in one_steps]
    assert len(dp_steps) == STEPS
    # the same rows each step: same token counts, and losses equal to float rounding
    assert [e["tokens"] for e in dp_steps] == [e["tokens"] for e in one_steps]
    for a, b in zip(dp_steps, one_steps, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    dp_eval = [e["eval_loss"] for e in events(dp_dir, "eval")]
    one_eval = [e["eval_loss"] for e in events(result.run_dir, "eval")]
    assert dp_eval == pytest.approx(one_eval, rel=1e-5) and len(dp_eval) == 3
    if name.startswith("grass"):  # MGN reduced across ranks == MGN of the global batch
        dp_imp = events(dp_dir, "probe_done")[0]["importance"]
        one_imp = events(result.run_dir, "probe_done")[0]["importance"]
        assert dp_imp == pytest.approx(one_imp, rel=1e-4)

    # parameters after N steps match within float32 summation-order tolerance. AdamW
    # divides each gradient by its own running RMS, so a weight whose gradient is
    # rounding noise (summed in another order across ranks) may move by up to lr
    # either way: the update as a whole is what must agree, to 0.1%.
    dp_w = load_file(dp_dir / "final/model.safetensors")
    one_w = load_file(result.run_dir / "final/model.safetensors")
    base = load_file(dp_w_base(dp_runs))
    assert dp_w.keys() == one_w.keys()
    for k in one_w:
        update = (one_w[k] - base[k]).norm() if k in base else one_w[k].norm()
        assert (dp_w[k] - one_w[k]).norm() <= 1e-3 * update + 1e-6, k
    moved = [k for k in one_w if k in base and not torch.equal(one_w[k], base[k])]
    assert len(moved) >= 4  # training changed the sampled blocks

    start = events(dp_dir, "start")[0]
    assert start["world_size"] == 2 and start["global_batch"] == 4
    assert "batch=4 (2 x 2 processes)" in proc.stdout


def dp_w_base(dp_runs) -> Path:
    model_dir, _, _ = dp_runs
    return model_dir / "model.safetensors"


def test_allreduce_bytes_are_the_active_groups_gradients(dp_runs):
    _, _, runs = dp_runs
    _, dp_dir, _ = runs["grass-offload-disk"]
    full_bytes = sum(t.numel() * t.element_size() for t in load_file(dp_w_base(dp_runs)).values())
    steps = events(dp_dir, "step")
    for e in steps:
        # float32: 4 bytes per trained parameter, nothing for frozen blocks
        assert e["allreduce_bytes"] == 4 * e["trainable_params"] == e["grad_bytes"]
        assert e["allreduce_bytes"] < 0.2 * full_bytes
    # probing reduced every block's gradient at each of its 2 steps: counted apart
    blocks = sum(
        t.numel() * t.element_size()
        for k, t in load_file(dp_w_base(dp_runs)).items()
        if ".layers." in k
    )
    assert events(dp_dir, "probe_done")[0]["allreduce_bytes"] == 2 * blocks
    # disk offload: one store per rank, removed at the end
    assert not (dp_dir / "offload").exists() or not any((dp_dir / "offload").rglob("*.bin"))


def test_resume_two_processes_and_refuse_a_different_world_size(dp_runs, tmp_path):
    _, _, runs = dp_runs
    recipe, straight_dir, _ = runs["grass-offload-disk"]
    out = tmp_path / "resumed"
    # stop after 3 steps (a checkpoint at the end), then continue to STEPS
    train_dp(recipe, f"output.dir={out}", "training.max_steps=3", script=True)
    ckpt = out / "checkpoints/step-0000003"
    assert sorted(p.name for p in ckpt.glob("rank-*.json")) == [
        "rank-00000.json",
        "rank-00001.json",
    ]
    assert json.loads((ckpt / "manifest.json").read_text())["world_size"] == 2

    # one process cannot continue a 2-process run: clear message, nothing written
    single = load_recipe(recipe, [f"output.dir={out}"])
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(GrassError, match="written by 2 process"):
        setup(single, Telemetry([]), resume="auto")
    assert (out / "metrics.jsonl").read_bytes() == before
    proc = subprocess.run(
        [sys.executable, "-m", "grass_cli", "train", str(recipe), f"output.dir={out}", "--resume",
         "auto", "--no-live"],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 2 and "written by 2 process(es) but this run has 1" in proc.stderr
    assert "Traceback" not in proc.stderr

    train_dp(recipe, f"output.dir={out}", "--resume", "auto")
    a, b = events(straight_dir, "step"), events(out, "step")
    assert [e["step"] for e in b] == list(range(STEPS))
    assert [e["loss"] for e in b] == [e["loss"] for e in a]
    assert [e["active"] for e in b] == [e["active"] for e in a]
    wa = load_file(straight_dir / "final/model.safetensors")
    wb = load_file(out / "final/model.safetensors")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def run_worker(mode: str, out: Path) -> list[dict]:
    proc = torchrun(str(ROOT / "tests/dist_worker.py"), mode, str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(2)]


def test_grad_reducer_sums_only_trainable_gradients(tmp_path):
    for r in run_worker("reducer", tmp_path):
        assert r["world"] == 2
        assert r["max_err"] < 1e-5
        assert r["bytes"] == r["trainable_bytes"] > 0
        assert not r["frozen_has_grad"]
        assert r["buckets"] == 2 and r["observed_all"] and r["first_nonzero"]


def test_ranks_that_disagree_stop_with_a_clear_message(tmp_path):
    for r in run_worker("disagree", tmp_path):
        assert r["raised"] and r["exit_code"] == 1
        assert "ranks disagree on the active blocks at step 7" in r["message"]
        assert "rank 0: [1, 2]; rank 1: [1, 3]" in r["message"]


def test_batch_iterator_shards_are_disjoint_and_cover_the_global_batch(tokenizer):
    from grass_cli.data import TokenizedData

    rows = [[1, 2, 3]] * 11
    data = TokenizedData(input_ids=rows, labels=rows, source="x", trainable_tokens=33)
    one = BatchIterator(data, 4, 0, seed=9)
    ranks = [BatchIterator(data, 2, 0, seed=9, rank=r, world=2) for r in range(2)]
    for _ in range(7):  # across an epoch boundary (11 rows: a short last batch)
        glob = one.next_indices()
        shards = [it.next_indices() for it in ranks]
        assert sorted(shards[0] + shards[1]) == sorted(glob)
        assert not set(shards[0]) & set(shards[1])
        assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()
    # a rank whose share is empty gets one row with no loss
    tail = BatchIterator(data, 4, 0, seed=9, rank=1, world=4)
    tail.position = 10  # one row left in the epoch: rank 1's share is empty
    assert tail.next_indices() == []
    assert bool((tail.batch([])["labels"] == -100).all())
