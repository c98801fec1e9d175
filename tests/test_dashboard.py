"""The live dashboard, rendered from synthetic telemetry into a recording console.

`synthetic_run` builds an event stream shaped like the engine's (same kinds, same
fields) with numbers chosen so the expected screen text can be written by hand;
test_console.py and test_plots.py reuse it.
"""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from grass_cli.telemetry.console import console_sinks
from grass_cli.telemetry.dashboard import (
    ACTIVE_MARK,
    Dashboard,
    DashboardState,
    bar,
    render,
    render_summary,
    sparkline,
    state_from_events,
)
from grass_cli.telemetry.dashboard_state import HANDLERS
from grass_cli.telemetry.importance_panel import ImportanceView
from grass_cli.telemetry.panels import render_header
from grass_cli.telemetry.sinks import PlainPrinter

MIB, GIB = 2**20, 2**30


def active_set(step: int, num_blocks: int, gamma: int, switch_interval: int) -> list[int]:
    start = (step // switch_interval) * 3
    return sorted({(start + 5 * k) % num_blocks for k in range(gamma)})


def synthetic_run(
    num_blocks: int = 32,
    steps: int = 20,
    gamma: int = 4,
    switch_interval: int = 5,
    probe_steps: int = 2,
    cuda: bool = False,
    eval_every: int = 10,
) -> list[dict]:
    """A GRASS run's events: start, eval, probing, switches, steps, evals, saved, end.

    Memory: weights 513.1 MiB, gradients 54.0 MiB, optimizer state (100 + 10 s) MiB
    at step s, RSS 2 GiB + s * 16 MiB except a 3 GiB spike at step 10, CUDA
    allocated / reserved / peak 1.5 / 2 / 2.5 GiB. Block L-1's MGN is unknown
    (None) until step 10. Every step takes 2 s and 400 tokens.
    """
    device = "cuda:0" if cuda else "cpu"
    importance = [0.001 * (1 + (b * 7) % 10) for b in range(num_blocks)]
    total = sum(importance)
    probabilities = [v / total for v in importance]
    ranking = sorted(range(num_blocks), key=lambda b: -importance[b])
    events: list[dict] = [
        {
            "event": "start",
            "model": "tiny-test-model",
            "model_source": "/models/tiny",
            "num_blocks": num_blocks,
            "blocks_path": "model.layers",
            "params": 1000,
            "tied": True,
            "strategy": "grass",
            "gamma": gamma,
            "total_steps": steps,
            "global_batch": 8,
            "train_rows": 100,
            "train_tokens": 4000,
            "eval_rows": 16,
            "device": device,
            "always_train": ["norm"],
            "run_dir": "runs/synthetic",
        },
        {"event": "eval", "step": 0, "eval_loss": 2.5, "eval_ppl": 12.18, "eval_tokens": 300},
    ]
    for t in range(probe_steps):
        events.append(
            {
                "event": "probe",
                "probe_step": t,
                "probe_steps": probe_steps,
                "loss": 2.6 - 0.1 * t,
                "rss": 2 * GIB,
            }
        )
    events.append(
        {
            "event": "probe_done",
            "importance": importance,
            "ranking": ranking,
            "probabilities": probabilities,
        }
    )
    previous: list[int] = []
    tokens_total = 0
    for s in range(steps):
        active = active_set(s, num_blocks, gamma, switch_interval)
        next_switch = (s // switch_interval + 1) * switch_interval
        if active != previous:
            events.append(
                {
                    "event": "switch",
                    "step": s,
                    "active": active,
                    "activated": [f"block.{b}" for b in active if b not in previous],
                    "frozen": [f"block.{b}" for b in previous if b not in active],
                    "next_switch": next_switch,
                }
            )
            previous = active
        tokens_total += 400
        imp = list(importance)
        if s < 10:
            imp[-1] = None
        mem = {
            "weights_bytes": 513 * MIB + MIB // 10,
            "grad_bytes": 54 * MIB,
            "optimizer_state_bytes": (100 + 10 * s) * MIB,
            "optimizer_state_offload_cpu_bytes": 0,
            "optimizer_state_offload_disk_bytes": 0,
            "master_weight_bytes": 0,
            "rss": 3 * GIB if s == 10 else 2 * GIB + s * 16 * MIB,
        }
        if cuda:
            mem |= {
                "cuda_allocated": 3 * GIB // 2,
                "cuda_reserved": 2 * GIB,
                "cuda_peak": 5 * GIB // 2,
            }
        events.append(
            {
                "event": "step",
                "step": s,
                "total_steps": steps,
                "loss": 2.0 - 0.05 * s,
                "lr": 1e-4,
                "grad_norm": 1.5,
                "tokens": 400,
                "tokens_total": tokens_total,
                "tokens_per_s": 200.0,
                "step_time": 2.0,
                "elapsed_s": 10.0 + 2.0 * (s + 1),
                "active": active,
                "importance": imp,
                "probabilities": probabilities,
                "trainable_params": 500,
                **mem,
                "next_switch": next_switch,
            }
        )
        if (s + 1) % eval_every == 0:
            events.append(
                {
                    "event": "eval",
                    "step": s + 1,
                    "eval_loss": 2.5 - 0.1 * (s + 1),
                    "eval_ppl": 5.0,
                    "eval_tokens": 300,
                }
            )
    events.append({"event": "saved", "path": "runs/synthetic/final"})
    evals = [e["eval_loss"] for e in events if e["event"] == "eval"]
    events.append(
        {
            "event": "end",
            "steps": steps,
            "elapsed_s": 12.0 + 2.0 * steps,
            "tokens": tokens_total,
            "final_loss": 2.0 - 0.05 * (steps - 1),
            "first_eval_loss": evals[0],
            "final_eval_loss": evals[-1],
            "best_eval_loss": min(evals),
            "peak_rss": 3 * GIB,
            "model_dir": "runs/synthetic/final",
            "run_dir": "runs/synthetic",
        }
    )
    return events


def upto_step(events: list[dict], step: int) -> list[dict]:
    """The events up to and including step `step`'s step event."""
    for i, e in enumerate(events):
        if e["event"] == "step" and e["step"] == step:
            return events[: i + 1]
    raise ValueError(step)


def expected_counts(events: list[dict], num_blocks: int) -> list[int]:
    counts = [0] * num_blocks
    for e in events:
        if e["event"] == "step":
            for b in e["active"]:
                counts[b] += 1
    return counts


def screen(renderable, width: int = 120, height: int = 50) -> str:
    console = Console(width=width, height=height, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


# One block cell: mark, index, bar (block characters, spaces or '?'), optional MGN,
# probability in percent, steps trained.
CELL = re.compile(
    r"(?P<mark>[ " + ACTIVE_MARK + r"]) +(?P<idx>\d+) (?P<bar>[█▉▊▋▌▍▎▏? ]+?)"
    r"(?: (?P<mgn>\d\.\de-\d\d|   -   ))? +(?P<p>\d+\.\d%|100%|-) +(?P<n>\d+)(?= │|\s*│?$)"
)


def block_cells(text: str) -> dict[int, dict[str, str]]:
    """Block index -> its cell's fields, from the importance panel only."""
    panel = text.split("Layer importance", 1)[1].split("Memory", 1)[0]
    cells: dict[int, dict[str, str]] = {}
    for line in panel.splitlines()[1:]:
        if not line.startswith("│ "):
            continue
        inner = line[2:].rstrip().removesuffix("│")  # the panel's border and padding
        for part in inner.split(" │ "):
            m = CELL.fullmatch(part.rstrip())
            if m:
                assert int(m["idx"]) not in cells, f"block {m['idx']} shown twice"
                cells[int(m["idx"])] = m.groupdict()
    return cells


# ------------------------------------------------------------------------- pieces


def test_bar_and_sparkline_scale():
    assert bar(1.0, 8) == "█" * 8
    assert bar(0.5, 8) == "████    "
    assert bar(0.5 + 1 / 16, 8) == "████▌   "
    assert bar(0.0, 4) == "    "
    assert bar(None, 5) == "?    "
    assert sparkline([1.0, 2.0, 3.0]) == "▁▅█"  # eight equal bins of the range
    assert sparkline([2.0, 2.0]) == "▁▁"


# ------------------------------------------------------------------- state alone


def test_state_counts_steps_per_block_without_a_terminal():
    events = synthetic_run(num_blocks=8, steps=12, gamma=2)
    seen = upto_step(events, 5)
    state = state_from_events(seen)
    assert state.step == 6 and state.phase == "training"
    assert state.active_counts == expected_counts(seen, 8) and sum(state.active_counts) == 12
    assert list(state.losses) == [2.0 - 0.05 * s for s in range(6)]
    assert state.memory["optimizer_state_bytes"] == 150 * MIB  # 100 + 10 * 5
    assert state.eta_s == 12.0  # 6 steps left at 2 s each
    assert state_from_events(upto_step(events, 11)).phase == "final eval"
    assert state_from_events(events).phase == "done"


def test_every_kind_the_sink_always_redraws_for_has_a_handler():
    assert not Dashboard.ALWAYS - set(HANDLERS)


def test_kinds_without_a_handler_change_nothing_on_screen():
    state = state_from_events(upto_step(synthetic_run(8), 3))
    before = screen(render(state))
    state.update({"event": "eval_start", "step": 4, "rss": 9 * GIB})  # the engine emits it
    assert screen(render(state)) == before


# ----------------------------------------------------------------------- rendering


@pytest.mark.parametrize(
    ("num_blocks", "width", "height"),
    [(32, 120, 40), (32, 80, 40), (80, 120, 45), (80, 100, 60)],
)
def test_a_row_per_block_with_active_blocks_marked(num_blocks, width, height):
    events = synthetic_run(num_blocks=num_blocks, steps=20, gamma=4)
    seen = upto_step(events, 12)
    text = screen(render(state_from_events(seen)), width, height)
    lines = text.splitlines()
    assert len(lines) <= height, "the dashboard must fit the terminal"
    assert max(len(line) for line in lines) <= width

    cells = block_cells(text)
    assert sorted(cells) == list(range(num_blocks))
    active = set(active_set(12, num_blocks, 4, 5))
    marked = {b for b, c in cells.items() if c["mark"] == ACTIVE_MARK}
    assert marked == active and len(active) == 4
    counts = expected_counts(seen, num_blocks)
    assert [int(cells[b]["n"]) for b in range(num_blocks)] == counts
    assert sum(counts) == 13 * 4  # 13 steps of 4 blocks
    probabilities = seen[-1]["probabilities"]
    for b in range(num_blocks):
        assert cells[b]["p"] == f"{100 * probabilities[b]:.1f}%"
    # Block L-1's MGN is still unknown at step 12? No: known from step 10 on.
    assert "?" not in cells[num_blocks - 1]["bar"]
    # The most important block has the full-width bar.
    top = max(range(num_blocks), key=lambda b: seen[-1]["importance"][b] or 0)
    assert cells[top]["bar"].strip() and set(cells[top]["bar"].strip()) == {"█"}


def test_importance_layout_takes_the_fewest_columns_that_fit_the_height():
    def layout(num_blocks: int, width: int, height: int) -> tuple[int, int, int, bool]:
        state = state_from_events(upto_step(synthetic_run(num_blocks), 12))
        lay = ImportanceView(state).layout(width, height)
        return lay.columns, lay.rows, lay.bar_width, lay.show_mgn

    assert layout(32, 120, 60) == (1, 32, 24, True)  # 41 rows left: one column
    assert layout(32, 120, 40) == (2, 16, 24, True)  # 21 rows left: two columns
    # three columns with MGN would still be 27 rows: four without it
    assert layout(80, 120, 40) == (4, 20, 13, False)


def test_unknown_importance_is_shown_as_unknown():
    events = synthetic_run(num_blocks=8, steps=20, gamma=2)
    cells = block_cells(screen(render(state_from_events(upto_step(events, 3))), 120, 40))
    assert cells[7]["bar"].startswith("?")
    assert all("?" not in cells[b]["bar"] for b in range(7))


def test_32_blocks_keep_the_mgn_column_and_80_blocks_drop_it_to_fit():
    text32 = screen(render(state_from_events(upto_step(synthetic_run(32), 12))), 120, 40)
    assert all(c["mgn"] for c in block_cells(text32).values())
    text80 = screen(render(state_from_events(upto_step(synthetic_run(80), 12))), 120, 40)
    assert not any(c["mgn"] for c in block_cells(text80).values())


def test_header_before_the_first_step_shows_dashes():
    text = screen(render_header(DashboardState()), 120, 10)
    assert "GRASS run" in text and "step 0/0" in text and "ETA -" in text
    assert "loss -" in text and "lr -" in text and "grad norm -" in text and "tok/s -" in text


def test_header_shows_progress_eta_rate_loss_and_next_switch():
    events = synthetic_run(num_blocks=32, steps=50)
    text = screen(render(state_from_events(upto_step(events, 19))))
    # 20 of 50 steps done, 2 s per step: 60 s left; 400 tokens per 2 s step.
    assert "step 20/50" in text and "40%" in text
    assert "ETA 1:00" in text and "elapsed 50s" in text
    assert "tok/s 200" in text and "tokens 8,000" in text
    assert "loss 1.0500" in text  # 2.0 - 0.05 * 19
    assert "eval 1.5000 (best 1.5000 @10)" in text
    assert "lr 1.00e-04" in text and "grad norm 1.50" in text
    assert "re-sampling @20" in text
    done = screen(render(state_from_events(upto_step(events, 49))))
    assert "re-sampling" not in done, "no re-sampling is due after the last step"
    assert "step 50/50" in done and "100%" in done
    assert "GRASS synthetic" in text and "grass γ=4" in text
    # the loss falls steadily: the trend arrow says so
    assert "↓" in text


def test_memory_panel_matches_the_step_event():
    events = synthetic_run(num_blocks=32, steps=20, cuda=True)
    text = screen(render(state_from_events(upto_step(events, 12))))
    memory = text.split("Memory", 1)[1].split("Events", 1)[0]
    flat = " ".join(memory.split())
    assert "weights 513.1 MiB" in flat
    assert "gradients 54.0 MiB" in flat
    assert "optim. on device 220.0 MiB" in flat  # 100 + 10 * 12
    assert "optim. on cpu 0 B" in flat and "optim. on disk 0 B" in flat
    assert "master weights 0 B" in flat
    # RSS at step 12: 2 GiB + 12 * 16 MiB = 2.1875 GiB; the spike at step 10 is the peak
    assert "host RSS 2.19 GiB (peak 3.00 GiB)" in flat
    assert "CUDA allocated 1.50 GiB" in flat and "CUDA reserved 2.00 GiB" in flat
    assert "CUDA peak 2.50 GiB" in flat


def test_memory_panel_has_no_cuda_rows_on_cpu():
    text = screen(render(state_from_events(upto_step(synthetic_run(8), 3))))
    assert "CUDA" not in text and "host RSS 2.05 GiB" in text  # 2 GiB + 48 MiB


def test_event_log_shows_switches_probing_warnings_and_saves():
    events = synthetic_run(num_blocks=32, steps=20)
    state = state_from_events(upto_step(events, 0))
    text = screen(render(state))
    assert "probing done: most important blocks" in text
    assert "step 0: training blocks 0,5,10,15" in text
    state.update({"event": "warning", "message": "embeddings and LM head are tied"})
    state.update(events[-2])  # saved
    text = screen(render(state))
    assert "warning: embeddings and LM head are tied" in text
    assert "saved the model to runs/synthetic/final" in text
    state = state_from_events(upto_step(events, 5))
    assert "step 5: training blocks 3,8,13,18 (froze 0,5,10,15)" in screen(render(state))


def test_loading_screen_before_any_event():
    text = screen(render(DashboardState()))
    assert "loading model and data" in text and "waiting for the model's blocks" in text


def test_summary_has_time_tokens_losses_peaks_and_files():
    events = synthetic_run(num_blocks=32, steps=20, cuda=True)
    state = state_from_events(events)
    flat = " ".join(screen(render_summary(state), width=200).split())
    assert "time 52s (52.0 s, 20 steps)" in flat
    assert "tokens 8,000 (154 tok/s over the whole run)" in flat  # 8000 / 52 s
    assert "train loss 1.0500 (last step)" in flat
    assert "eval loss 2.5000 at step 0 → 0.5000 at step 20 (best 0.5000 at step 20)" in flat
    # peaks over the run, not the last step's values
    assert "optim. on device 290.0 MiB" in flat
    assert "host RSS 3.00 GiB" in flat and "CUDA peak 2.50 GiB" in flat
    assert "model runs/synthetic/final" in flat and "files runs/synthetic/" in flat
    assert "preemption" not in flat  # no checkpoint timed: no advice


def test_summary_gives_the_grace_period_a_sigterm_needs():
    events = synthetic_run(num_blocks=32, steps=20, cuda=True)
    end = events[-1]
    assert end["event"] == "end"
    end.update(slowest_step_s=4.0, slowest_checkpoint_s=30.0, sigterm_needs_s=34.0)
    flat = " ".join(screen(render_summary(state_from_events(events)), width=200).split())
    # 1.5 x 34 s = 51 s, rounded up to 10 s
    assert (
        "preemption a SIGTERM needs up to 34.0s here (step 4.0s + checkpoint 30.0s): allow "
        "60s (SLURM --signal=TERM@60, Kubernetes terminationGracePeriodSeconds: 60)"
    ) in flat


# ---------------------------------------------------------------------------- sink


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def live_console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=120, height=50), out


def test_dashboard_throttles_redraws_by_time():
    clock = FakeClock()
    console, _ = live_console()
    dash = Dashboard(console, max_fps=4.0, clock=clock)
    events = synthetic_run(num_blocks=32, steps=100, eval_every=1000)
    for e in events[:-2]:
        if e["event"] == "step":
            clock.now += 0.01  # 100 fast steps: one second in all
        dash.emit(e)
    always = sum(e["event"] in Dashboard.ALWAYS for e in events[:-2])
    # 1 s at 4 redraws per second, plus start / evals / probe_done, plus the first step
    assert always <= dash.refreshes <= always + 4 + 1
    dash.close()


def test_dashboard_redraws_every_slow_step_and_prints_the_summary_at_end():
    clock = FakeClock()
    console, out = live_console()
    dash = Dashboard(console, max_fps=4.0, clock=clock)
    events = synthetic_run(num_blocks=32, steps=20)
    for e in events:
        clock.now += 2.0
        dash.emit(e)
    assert dash.refreshes == len(events)
    text = out.getvalue()
    assert "Run finished: synthetic" in text
    assert text.index("Run finished") > text.rindex("Layer importance")
    assert dash.state.step == 20 and dash.state.phase == "done"
    dash.close()  # already stopped at `end`: closing again is harmless
    assert out.getvalue() == text


def test_close_without_end_stops_the_display():
    console, out = live_console()
    dash = Dashboard(console)
    dash.emit(synthetic_run(num_blocks=8)[0])
    dash.close()
    assert not dash.live.is_started
    assert "Run finished" not in out.getvalue()


# ------------------------------------------------------------------ console choice


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_console_sinks_pick_the_dashboard_only_on_a_live_terminal(monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    (sink,) = console_sinks(TTY(), live=True, every=5, quiet=False)
    assert isinstance(sink, Dashboard)
    sink.close()
    (sink,) = console_sinks(TTY(), live=False, every=5, quiet=False)  # --no-live
    assert isinstance(sink, PlainPrinter) and sink.every == 5 and not sink.quiet
    (sink,) = console_sinks(io.StringIO(), live=True, every=3, quiet=False)  # a pipe or file
    assert isinstance(sink, PlainPrinter) and sink.every == 3
    (sink,) = console_sinks(TTY(), live=True, every=5, quiet=True)
    assert isinstance(sink, PlainPrinter) and sink.quiet
    monkeypatch.setenv("TERM", "dumb")
    (sink,) = console_sinks(TTY(), live=True, every=5, quiet=False)
    assert isinstance(sink, PlainPrinter)


def test_resumed_run_checkpoints_and_task_evals_in_the_dashboard():
    state = DashboardState()
    state.update(
        {
            "event": "resume",
            "step": 8,
            "total_steps": 12,
            "path": "runs/exp1/checkpoints/step-0000008",
        }
    )
    assert state.run_name == "exp1" and state.step == 8 and state.total_steps == 12
    for e in synthetic_run(num_blocks=8, steps=12, gamma=2):
        if e["event"] == "step" and e["step"] >= 8:
            state.update(e)
    state.update({"event": "checkpoint", "step": 12, "path": "runs/exp1/checkpoints/step-0000012"})
    state.update({"event": "task_eval", "step": 12, "rows": 50, "accuracy": 0.62, "dir": "x"})
    text = screen(render(state))
    assert "GRASS exp1" in text and "step 12/12" in text
    assert "resumed at step 8 from runs/exp1/checkpoints/step-0000008" in text
    assert "checkpoint at step 12: runs/exp1/checkpoints/step-0000012" in text
    assert "task eval at step 12: accuracy 0.6200" in text
    # blocks are counted from the steps seen since the resume: 4 steps of 2 blocks
    assert sum(int(c["n"]) for c in block_cells(text).values()) == 8
