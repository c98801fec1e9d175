"""The two-tier store (optimizer.offload.host_budget): pinned host memory up to a
budget, the rest on disk; bit-identical training, a budget that holds (measured),
copies not references, the next interval's blocks read ahead of the switch, and
a kill during tier moves that resumes identically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import ListSink

from grass_cli.engine import setup, train
from grass_cli.offload.tiered import TieredStore
from grass_cli.recipe import validate_dict
from grass_cli.telemetry import Telemetry

ROOT = Path(__file__).resolve().parent.parent
TRAIN = str(ROOT / "data/quickstart/train.jsonl")
CPU = torch.device("cpu")


def chunk(seed: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g), torch.randn(n // 2 + 1, generator=g)]


def nbytes(ts: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


@pytest.mark.parametrize("overlap", [True, False])
def test_a_random_workload_is_exact_and_stays_within_the_budget(tmp_path, overlap):
    """Puts, prefetches, gets and stages of chunks of several sizes in random order:
    every get returns what was last put, bit for bit, and the host bytes the store
    held (hot slabs + disk buffers in flight, measured after every call) never
    passed the budget."""
    rng = np.random.default_rng(0)
    sizes = {f"block.{i}@{j}": int(rng.integers(1000, 20000)) for i in range(8) for j in range(3)}
    budget = sum(4 * (n + n // 2 + 1) for n in sizes.values()) // 3  # a third fits
    store = TieredStore(CPU, budget, tmp_path / "s", overlap=overlap)
    truth: dict[str, list[torch.Tensor]] = {}
    peak = 0
    for step in range(400):
        name = str(rng.choice(list(sizes)))
        op = rng.integers(4)
        if op <= 1 or name not in truth:
            tensors = chunk(step, sizes[name])
            truth[name] = [t.clone() for t in tensors]
            store.put(name, tensors)
        elif op == 2:
            got = store.get(name, CPU)
            assert all(torch.equal(a, b) for a, b in zip(got, truth[name], strict=True)), name
            store.put(name, got)  # the optimizer gives it back after its step
        else:
            store.stage([n for n in rng.choice(list(truth), size=3)])
        peak = max(peak, store.host_bytes())
        if step % 50 == 0:
            store.settle()
    assert peak <= budget and store.peak_host <= budget, (peak, store.peak_host, budget)
    assert store.evictions > 0 and any(store.tier(n) == "cold" for n in truth)
    for name, want in truth.items():
        got = store.host_tensors(name)
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), name
    store.close()
    assert not list((tmp_path / "s").glob("*.bin"))


def test_a_chunk_on_disk_shares_no_storage_with_live_tensors(tmp_path):
    """Evicted to the cold tier, a chunk is bytes in a file: changing the tensors
    that were put, or the ones got back, never changes what the store holds."""
    store = TieredStore(CPU, budget=10_000, folder=tmp_path / "s")
    live = chunk(1, 1500)  # 9 KB
    want = [t.clone() for t in live]
    store.put("a@0", live)
    store.put("b@0", chunk(2, 1500))  # evicts a@0 to disk
    store.settle()
    assert store.tier("a@0") == "cold"
    raw = np.fromfile(tmp_path / "s" / "a@0.bin", dtype=np.uint8)
    assert raw.tobytes() == b"".join(t.numpy().tobytes() for t in want)
    for t in live:
        t.add_(1.0)
    back = store.get("a@0", CPU)
    assert all(torch.equal(a, b) for a, b in zip(back, want, strict=True))
    live_ptrs = {t.untyped_storage().data_ptr() for t in live}
    assert not live_ptrs & {t.untyped_storage().data_ptr() for t in back}
    back[0].zero_()
    assert torch.equal(store.host_tensors("a@0")[0], want[0])
    store.close()


def recipe(model: Path, out: Path, gamma: int = 2, **offload) -> object:
    return validate_dict(
        {
            "model": {"path": str(model)},
            "data": {"train": TRAIN, "max_length": 64, "limit": 32},
            "sampler": {"strategy": "lisa", "gamma": gamma, "switch_interval": 3},
            "optimizer": {
                "lr": 1e-3,
                "weight_decay": 0.01,
                "state_policy": "offload",
                "offload": {"target": "cpu", **offload},
            },
            "training": {"max_steps": 12, "micro_batch_size": 4, "seed": 3, "device": "cpu"},
            "output": {"dir": str(out), "save_model": False},
        },
        "test.yaml",
    )


def run(rec) -> tuple[object, ListSink, object]:
    sink = ListSink()
    r = setup(rec, Telemetry([sink]), overwrite=True)
    result = train(r)
    return r, sink, result


@pytest.fixture(scope="module")
def pinned_run(tiny_factory, tmp_path_factory):
    out = tmp_path_factory.mktemp("pinned")
    rec = recipe(tiny_factory("llama", 6), out, gamma=1, host_budget=None)
    r, _, result = run(rec)
    params = {n: p.detach().clone() for n, p in r.model.named_parameters()}
    r.optimizer.store.close()
    return params, result.losses


@pytest.mark.parametrize("residency", ["interval", "step"])
def test_training_with_a_small_budget_is_bit_identical_to_all_pinned(
    residency, pinned_run, tiny_factory, tmp_path
):
    """A budget of a quarter of the blocks' state (6 blocks, 1 trained at a time): chunks
    spill to disk and come back, and the losses and weights are those of the
    all-pinned store. The store's measured peak of host bytes (its slabs and the disk
    reads and writes in flight) stayed within the budget."""
    folder = tiny_factory("llama", 6)
    probe = setup(
        recipe(folder, tmp_path / "p", 1, host_budget=None), Telemetry([]), overwrite=True
    )
    blocks = [b.name for b in probe.block_map.blocks]  # (embeddings and head are frozen)
    whole = probe.optimizer.offload_bytes_needed(blocks)
    probe.optimizer.store.close()
    budget_gb = whole / 4 / 1e9
    rec = recipe(folder, tmp_path / "run", 1, host_budget=budget_gb, residency=residency)
    r, sink, result = run(rec)
    store = r.optimizer.store
    assert isinstance(store, TieredStore) and store.budget == int(budget_gb * 1e9)
    assert store.evictions > 0 and store.peak_host <= store.budget
    assert result.losses == pinned_run[1]
    for name, p in r.model.named_parameters():
        assert torch.equal(p, pinned_run[0][name]), name
    store.close()


def test_the_next_intervals_blocks_are_read_before_the_switch(tiny_factory, tmp_path):
    """Cyclic draws are known ahead: two steps before each switch the store starts
    reading the coming blocks' state from disk, so the switch finds it read."""
    folder = tiny_factory("llama", 6)
    probe = setup(recipe(folder, tmp_path / "p", host_budget=None), Telemetry([]), overwrite=True)
    block = probe.optimizer.offload_bytes_needed(["block.0"])
    probe.optimizer.store.close()
    # room for 3 of the 4 frozen blocks: the 4th spills, and staging evicts for more
    rec = recipe(folder, tmp_path / "run", host_budget=3.2 * block / 1e9, stage_steps=2)
    rec.sampler.strategy = "cyclic"
    rec.training.max_steps = 18
    staged: list[tuple[int, list[str]]] = []
    r = setup(rec, Telemetry([]), overwrite=True)
    store = r.optimizer.store
    original = store.stage

    def spy(names: list[str]) -> None:
        staged.append((r.sampler.last_switch, sorted({n.split("@")[0] for n in names})))
        original(names)

    store.stage = spy
    train(r)
    # switches every 3 steps (blocks 0-1, 2-3, 4-5, 0-1, ...); a stage call comes one
    # step into each interval (2 before its end) and names the next interval's
    # blocks, once they have state to read (from the second sweep on)
    assert [s for s, _ in staged] == [0, 3, 6, 9, 12, 15]
    assert staged[2:] == [
        (6, ["block.0", "block.1"]),
        (9, ["block.2", "block.3"]),
        (12, ["block.4", "block.5"]),
        (15, ["block.0", "block.1"]),
    ]
    assert store.stage_hits > 0
    store.close()


def test_a_kill_during_tier_moves_resumes_identically(tiny_factory, tmp_path):
    """SIGKILL a real `grass train` with a tiny budget (every switch moves chunks
    between the tiers) after its first checkpoint; `--resume auto` finishes with the
    same losses and weights as a run never killed."""
    folder = tiny_factory("llama", 4)
    probe = setup(recipe(folder, tmp_path / "p", host_budget=None), Telemetry([]), overwrite=True)
    block = probe.optimizer.offload_bytes_needed(["block.0"])
    probe.optimizer.store.close()
    # one and a half blocks pinned: every switch evicts to disk and reads back
    base = recipe(folder, tmp_path / "x", host_budget=1.5 * block / 1e9).model_dump(mode="json")
    base["checkpoint"] = {"interval": 2, "keep_last": 3}
    base["training"]["max_steps"] = 14

    def write(out: Path) -> Path:
        d = json.loads(json.dumps(base))
        d["output"]["dir"] = str(out)
        path = out.parent / f"{out.name}.yaml"
        path.write_text(yaml.safe_dump(d))
        return path

    cmd = [sys.executable, "-m", "grass_cli", "train", "--no-live"]
    straight = write(tmp_path / "straight")
    subprocess.run([*cmd, str(straight)], check=True, capture_output=True)
    killed = write(tmp_path / "killed")
    proc = subprocess.Popen([*cmd, str(killed)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "killed/checkpoints").glob("step-*4")):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert not (tmp_path / "killed/summary.json").exists()
    res = subprocess.run([*cmd, str(killed), "--resume", "auto"], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr

    def steps(run: Path) -> dict[int, float]:
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {e["step"]: e["loss"] for e in lines if e["event"] == "step"}

    assert steps(tmp_path / "killed") == steps(tmp_path / "straight")
    # and the run did move state between the tiers: some of it was on disk
    events = [json.loads(x) for x in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    assert max(e.get("optimizer_state_offload_disk_bytes", 0) for e in events) > 0
    from safetensors.torch import load_file

    def final(run: Path) -> dict[str, torch.Tensor]:
        (path,) = sorted((run / "checkpoints").glob("step-*"))[-1:]
        return load_file(next(path.glob("model*.safetensors")))

    a, b = final(tmp_path / "killed"), final(tmp_path / "straight")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
