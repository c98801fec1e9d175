"""The disk probe (measured once per filesystem, cached, its file removed) and the
disk traffic `grass plan` predicts for a disk-backed optimizer-state store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from grass_cli.cli import app
from grass_cli.planner.disk_speed import DiskSpeed, disk_speed, measure, traffic

ROOT = Path(__file__).resolve().parent.parent
GPU = str(ROOT / "recipes/gpu-grass.yaml")
runner = CliRunner()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("GRASS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "disk-speed.json"


def test_the_probe_measures_and_leaves_nothing_behind(tmp_path):
    folder = tmp_path / "not-yet" / "offload"  # probed where it would be made
    speed = measure(folder, nbytes=8 * 2**20)
    assert speed.read_bps > 1e6 and speed.write_bps > 1e6  # any disk does 1 MB/s
    assert speed.source == f"measured now under {tmp_path}"
    assert list(tmp_path.iterdir()) == []  # its file is gone, nothing was made


def test_a_filesystem_is_probed_once_then_read_from_the_cache(tmp_path, cache):
    first = disk_speed(tmp_path)
    assert first.source.startswith("measured now")
    saved = json.loads(cache.read_text())
    (entry,) = saved.values()
    assert entry["read_bps"] == first.read_bps and entry["folder"] == str(tmp_path)
    again = disk_speed(tmp_path / "sub")  # the same filesystem: no second probe
    assert (again.read_bps, again.write_bps) == (first.read_bps, first.write_bps)
    assert again.source.startswith("measured on ")
    fresh = disk_speed(tmp_path, again=True)  # grass plan --probe-disk
    assert fresh.source.startswith("measured now")
    assert json.loads(cache.read_text())[next(iter(saved))]["read_bps"] == fresh.read_bps
    given = disk_speed(tmp_path, given_gbps=2.5)
    assert (given.read_bps, given.source) == (2.5e9, "--disk-speed")


def plan_of(*overrides: str):
    """The recipe (gamma and host budget resolved, as grass plan does for 32 GB of
    RAM), the 8B layout and the recipe's own plan."""
    from grass_cli.planner.machine import host_memory
    from grass_cli.planner.memory import recipe_scenario
    from grass_cli.planner.resolve import plan_resolved
    from grass_cli.recipe import load_recipe

    r = load_recipe(Path(GPU), list(overrides))
    r, lay, plans = plan_resolved(
        r, "llama-3.1-8b", None, 24.0, host=host_memory(32), beside=(0, 0)
    )
    label = recipe_scenario(r).label
    return r, lay, next(p for p in plans if p.label == label)


def test_traffic_of_each_disk_backed_store():
    """A disk store streamed per matrix moves the active blocks' state every step;
    moved per switch, once a switch; the two-tier store moves the spilled share."""
    r, lay, p = plan_of("optimizer.offload.target=disk", "optimizer.offload.residency=step")
    t = traffic(r, lay, p)
    block = lay.groups[lay.blocks[0]].numel * p.state_bytes_per_param
    assert t.every_steps == 1 and t.read == t.written == int(r.sampler.gamma * block)
    r, lay, p = plan_of("optimizer.offload.target=disk", "optimizer.offload.residency=interval")
    assert traffic(r, lay, p).every_steps == r.sampler.switch_interval
    r, lay, p = plan_of("optimizer.offload.host_budget=20")
    t = traffic(r, lay, p)
    cold = p.disk_bytes / (p.host_kinds["store_pinned"] + p.disk_bytes)
    assert 0 < cold < 1 and t.read == int(int(r.sampler.gamma * block) * cold)
    speed = DiskSpeed(2e9, 1e9, "given")
    assert t.seconds(speed) == pytest.approx(t.read / 2e9 + t.written / 1e9)
    r, lay, p = plan_of("optimizer.offload.host_budget=null")  # all pinned: no traffic
    assert traffic(r, lay, p) is None


def test_grass_plan_says_the_traffic_and_its_time_for_the_8b_on_24_gb(cache):
    res = runner.invoke(
        app,
        [
            "plan", GPU, "--model-config", "llama-3.1-8b", "--device-memory", "24",
            "--host-memory", "32", "--disk-speed", "1.5", "checkpoint.at_end=false",
            "output.save_model=false",
        ],
    )  # fmt: skip
    out = " ".join(res.stdout.split())
    assert "fits 24 GB" in out and "of --host-memory's 32.00 GB (28.80 usable); fits" in out
    assert "* disk traffic (two-tier store," in out
    assert "at 1.50 GB/s read and 1.50 GB/s write (--disk-speed)" in out
    assert not cache.exists()  # a given speed probes nothing
    res = runner.invoke(
        app,
        [
            "plan", GPU, "--model-config", "llama-3.1-8b", "--device-memory", "24",
            "--host-memory", "32", "--disk-speed", "1.5", "--json",
        ],
    )  # fmt: skip
    own = [p for p in json.loads(res.stdout) if p["disk_traffic"]]
    assert len(own) == 1 and own[0]["disk_traffic"]["read_bps"] == 1.5e9
