"""Run plots: the data they are drawn from, the PNGs, `grass plot`, and `grass train`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_dashboard import active_set, synthetic_run
from typer.testing import CliRunner

from grass_cli.cli import app
from grass_cli.errors import GrassError
from grass_cli.plots import (
    PLOT_FILES,
    active_counts,
    importance_history,
    load_metrics,
    plot_active_counts,
    plot_importance_bars,
    plot_importance_heatmap,
    plot_loss,
    plot_memory,
    write_run_plots,
)

runner = CliRunner()


def assert_real_png(path: Path, min_w: int = 400, min_h: int = 250) -> None:
    """Exists, decodes, has a real size and more than a few distinct colours."""
    import matplotlib.image as mpimg
    import numpy as np

    assert path.is_file() and path.stat().st_size > 5_000
    image = mpimg.imread(path)
    h, w = image.shape[:2]
    assert w >= min_w and h >= min_h, (w, h)
    colours = np.unique((image[..., :3] * 255).astype(np.uint8).reshape(-1, 3), axis=0)
    assert len(colours) > 20, len(colours)


def write_metrics(run_dir: Path, events: list[dict]) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return run_dir


# --------------------------------------------------------------------------- data


def test_active_counts_and_importance_history():
    events = synthetic_run(num_blocks=8, steps=12, gamma=2, switch_interval=5)
    counts = active_counts(events)
    expected = [0] * 8
    for s in range(12):
        for b in active_set(s, 8, 2, 5):
            expected[b] += 1
    assert counts == expected and sum(counts) == 24
    steps, rows = importance_history(events)
    assert steps == list(range(12))
    assert all(len(r) == 8 for r in rows)
    assert (
        rows[0][7] is None and rows[9][7] is None and rows[10][7] == pytest.approx(0.010)
    )  # 0.001 * (1 + 49 % 10)


def test_a_resumed_run_counts_each_step_once():
    events = synthetic_run(num_blocks=8, steps=12, gamma=2, switch_interval=5)
    # a resume from a checkpoint at step 8 repeats steps 8..11 with other blocks
    redo = [dict(e, active=[1, 2]) for e in events if e["event"] == "step" and e["step"] >= 8]
    counts = active_counts(events + redo)
    first = active_counts([e for e in events if e["event"] != "step" or e["step"] < 8])
    assert counts[1] == first[1] + 4 and counts[2] == first[2] + 4
    assert sum(counts) == 24
    assert importance_history(events + redo)[0] == list(range(12))


def test_load_metrics_errors_and_a_cut_last_line(tmp_path):
    with pytest.raises(GrassError, match="no metrics.jsonl in the run dir"):
        load_metrics(tmp_path)
    events = synthetic_run(num_blocks=4, steps=3, gamma=1)
    text = "".join(json.dumps(e) + "\n" for e in events)
    (tmp_path / "metrics.jsonl").write_text(text + '{"event": "st')  # killed mid-write
    assert load_metrics(tmp_path) == events
    (tmp_path / "metrics.jsonl").write_text('{"event": "start"}\nnot json\n' + text)
    with pytest.raises(GrassError, match=r"metrics.jsonl:2: not a JSON line"):
        load_metrics(tmp_path)


# -------------------------------------------------------------------------- plots


def test_each_plot_is_a_real_png(tmp_path):
    events = synthetic_run(num_blocks=32, steps=40, gamma=4, cuda=True)
    assert_real_png(plot_importance_heatmap(events, tmp_path / "heat.png"))
    assert_real_png(plot_active_counts(events, tmp_path / "counts.png"))
    assert_real_png(plot_loss(events, tmp_path / "loss.png"))
    assert_real_png(plot_memory(events, tmp_path / "mem.png"))
    importance = [e for e in events if e["event"] == "step"][-1]["importance"]
    path = plot_importance_bars(
        importance,
        tmp_path / "bars.png",
        "MGN",
        compare=importance[::-1],
        labels=("probe", "final"),
    )
    assert_real_png(path)


def test_plots_need_steps():
    start_only = synthetic_run(num_blocks=4, steps=2)[:1]
    for plot in (plot_importance_heatmap, plot_active_counts, plot_memory):
        with pytest.raises(GrassError, match="nothing to plot"):
            plot(start_only, Path("unused.png"))


def test_grass_plot_command(tmp_path):
    run_dir = write_metrics(tmp_path / "run", synthetic_run(num_blocks=8, steps=12, gamma=2))
    res = runner.invoke(app, ["plot", str(run_dir)])
    assert res.exit_code == 0, res.output
    paths = [Path(x) for x in res.stdout.split()]
    assert [p.name for p in paths] == list(PLOT_FILES)
    for p in paths:
        assert p.parent == run_dir / "plots"
        assert_real_png(p)
    res = runner.invoke(app, ["plot", str(tmp_path / "nowhere")])
    assert res.exit_code == 2
    assert "no metrics.jsonl in the run dir" in res.stderr
    empty = write_metrics(tmp_path / "empty", synthetic_run(num_blocks=4, steps=2)[:2])
    res = runner.invoke(app, ["plot", str(empty)])
    assert res.exit_code == 2 and "no training step" in res.stderr


def test_write_run_plots_replaces_old_ones(tmp_path):
    run_dir = write_metrics(tmp_path / "run", synthetic_run(num_blocks=8, steps=6, gamma=2))
    first = write_run_plots(run_dir)
    sizes = [p.stat().st_size for p in first]
    write_metrics(run_dir, synthetic_run(num_blocks=8, steps=30, gamma=2))
    second = write_run_plots(run_dir)
    assert first == second
    assert [p.stat().st_size for p in second] != sizes


# ------------------------------------------------------------------ through train


def test_grass_train_quiet_writes_the_plots(tiny_factory, tmp_path):
    from grass_cli.recipe import validate_dict

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "run"
    recipe = validate_dict(
        {
            "model": {"path": str(tiny_factory("llama", 4))},
            "data": {
                "train": str(root / "data/quickstart/train.jsonl"),
                "max_length": 64,
                "limit": 24,
            },
            "sampler": {"strategy": "grass", "gamma": 2, "switch_interval": 2, "probe_steps": 2},
            "training": {"max_steps": 4, "micro_batch_size": 4, "seed": 0},
            "output": {"dir": str(out), "save_model": False},
        },
        "test.yaml",
    )
    rec = tmp_path / "r.yaml"
    rec.write_text(recipe.to_yaml())
    res = runner.invoke(app, ["train", str(rec), "--quiet"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    # (the final checkpoint was timed: the summary says what a SIGTERM needs)
    assert [x.split()[0] for x in lines] == ["done", "peak", "files", "preempt", "plots"], lines
    assert lines[0].startswith("done   steps=4 ") and "model=-" in lines[0]
    summary = json.loads((out / "summary.json").read_text())
    assert f"peak_rss={_compact_bytes(summary['peak_rss'])}" in lines[0]
    assert lines[4] == f"plots  {out / 'plots'} ({', '.join(PLOT_FILES)})"
    for name in PLOT_FILES:
        assert_real_png(out / "plots" / name)
    counts = active_counts(load_metrics(out))
    assert sum(counts) == 4 * 2 and len(counts) == 4


def _compact_bytes(n: int) -> str:
    from grass_cli.telemetry.sinks import format_bytes

    return format_bytes(n).replace(" ", "")


def test_the_cli_imports_no_matplotlib_torch_or_live_display():
    import subprocess
    import sys

    code = (
        "import sys, grass_cli.cli; "
        "print(sorted(m for m in ('matplotlib', 'torch', 'rich.live', 'tensorboard') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
