"""Plain-mode console lines, the quiet summary, and the TensorBoard sink."""

from __future__ import annotations

import io
import sys

import pytest
from test_dashboard import synthetic_run

from grass_cli.errors import GrassError
from grass_cli.telemetry import Telemetry
from grass_cli.telemetry.sinks import PlainPrinter, format_bytes, format_duration

SUMMARY = [
    "done   steps=12 time=36.0s tokens=4800 final_loss=1.4500 eval_loss=1.5000 "
    "best_eval_loss=1.5000 peak_rss=3.00GiB model=runs/synthetic/final",
    "peak   weights=513.1MiB grads=54.0MiB optim=210.0MiB optim_cpu=0B optim_disk=0B "
    "master=0B rss=3.00GiB",
    "files  run_dir=runs/synthetic metrics=runs/synthetic/metrics.jsonl "
    "summary=runs/synthetic/summary.json recipe=runs/synthetic/recipe.yaml",
]


def printed(events: list[dict], **kwargs) -> list[str]:
    out = io.StringIO()
    telemetry = Telemetry([PlainPrinter(out, **kwargs)])
    for e in events:
        telemetry.emit(e["event"], **{k: v for k, v in e.items() if k != "event"})
    telemetry.close()
    return out.getvalue().splitlines()


def test_plain_mode_line_by_line():
    events = synthetic_run(num_blocks=8, steps=12, gamma=2, switch_interval=5, eval_every=10)
    assert printed(events, every=4) == [
        "start  model=tiny-test-model blocks=8 strategy=grass steps=12 batch=8 "
        "train_rows=100 device=cpu",
        "eval   step=0 eval_loss=2.5000 ppl=12.18",
        "probe  2/2 loss=2.5000",
        "probe  done; MGN ranks (most important first): 7,4,1,5,2,6,3,0",
        # 2 s per step: 8 steps left = 16 s; switches folded into the next line
        "step     4/12 loss=1.8500 lr=1.00e-04 gnorm=1.500 tok/s=200 active=0,5 mem=2.05GiB "
        "eta=16s switched@0",
        "step     8/12 loss=1.6500 lr=1.00e-04 gnorm=1.500 tok/s=200 active=0,3 mem=2.11GiB "
        "eta=8s switched@5",
        "eval   step=10 eval_loss=1.5000 ppl=5.00",
        "step    12/12 loss=1.4500 lr=1.00e-04 gnorm=1.500 tok/s=200 active=3,6 mem=2.17GiB "
        "switched@10",
        "saved  runs/synthetic/final",
        *SUMMARY,
    ]


def test_every_step_and_every_probe_step():
    events = synthetic_run(num_blocks=8, steps=3, gamma=2, switch_interval=5, probe_steps=3)
    lines = printed(events, every=1)
    assert [x.split(" loss=")[0] for x in lines if x.startswith(("step", "probe  "))] == [
        "probe  1/3",
        "probe  2/3",
        "probe  3/3",
        "probe  done; MGN ranks (most important first): 7,4,1,5,2,6,3,0",
        "step     1/3",
        "step     2/3",
        "step     3/3",
    ]
    # the first step's line carries the initial active set; later ones no switch
    assert lines[[i for i, x in enumerate(lines) if x.startswith("step")][0]].endswith("switched@0")
    assert sum("switched@" in x for x in lines) == 1


def test_quiet_prints_the_summary_only():
    events = synthetic_run(num_blocks=8, steps=12, gamma=2, switch_interval=5, eval_every=10)
    assert printed(events, every=1, quiet=True) == SUMMARY


def test_summary_without_eval_or_steps():
    end = {
        "event": "end",
        "steps": 0,
        "elapsed_s": 1.0,
        "tokens": 0,
        "final_loss": None,
        "first_eval_loss": None,
        "final_eval_loss": None,
        "best_eval_loss": None,
        "peak_rss": 0,
        "model_dir": None,
        "run_dir": "runs/x",
    }
    assert printed([end]) == [
        "done   steps=0 time=1.0s tokens=0 final_loss=- peak_rss=0B model=-",
        "files  run_dir=runs/x metrics=runs/x/metrics.jsonl summary=runs/x/summary.json "
        "recipe=runs/x/recipe.yaml",
    ]


def test_byte_and_duration_formats():
    assert [format_bytes(n) for n in (0, 1023, 1536, 54 * 2**20, 2.07 * 2**30, 3 * 2**40)] == [
        "0 B",
        "1023 B",
        "1.50 KiB",
        "54.0 MiB",
        "2.07 GiB",
        "3.00 TiB",
    ]
    assert [format_duration(s) for s in (0, 41.6, 60, 187, 3723, None)] == [
        "0s",
        "42s",
        "1:00",
        "3:07",
        "1:02:03",
        "-",
    ]


# ---------------------------------------------------------------------- tensorboard


def test_tensorboard_sink_writes_the_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from grass_cli.telemetry.tensorboard import TensorBoardSink

    log_dir = tmp_path / "tensorboard"
    stale = log_dir / "events.out.tfevents.0.old"
    log_dir.mkdir()
    stale.write_bytes(b"")
    events = synthetic_run(num_blocks=8, steps=12, gamma=2, switch_interval=5, eval_every=10)
    sink = TensorBoardSink(log_dir)
    for e in events:
        sink.emit(e)
    sink.close()
    assert not stale.exists(), "a replaced run's event files are removed"
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    loss = acc.Scalars("train/loss")
    assert [s.step for s in loss] == list(range(12))
    assert [round(s.value, 4) for s in loss] == [round(2.0 - 0.05 * s, 4) for s in range(12)]
    assert [(s.step, round(s.value, 4)) for s in acc.Scalars("eval/loss")] == [(0, 2.5), (10, 1.5)]
    opt = acc.Scalars("memory/optimizer_state_mib")
    assert [s.value for s in opt] == [100.0 + 10 * s for s in range(12)]
    # Block 7's MGN is unknown until step 10: its tag starts there; others at step 0.
    assert acc.Scalars("importance/block_07")[0].step == 10
    assert acc.Scalars("importance/block_01")[0].step == 0
    assert {"run/start/text_summary", "run/end/text_summary"} <= set(acc.Tags()["tensors"])


def test_tensorboard_missing_package_is_a_user_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    from grass_cli.telemetry.tensorboard import TensorBoardSink

    with pytest.raises(GrassError) as err:
        TensorBoardSink(tmp_path / "tb")
    assert "pip install 'grass-cli[tensorboard]'" in str(err.value)
    assert "output.tensorboard" in str(err.value)
    assert not (tmp_path / "tb").exists()


def test_tensorboard_keeps_setup_warnings_and_purges_on_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from grass_cli.telemetry.tensorboard import TensorBoardSink

    log_dir = tmp_path / "tensorboard"
    events = synthetic_run(num_blocks=8, steps=12, gamma=2, switch_interval=5, eval_every=10)
    first = TensorBoardSink(log_dir)
    first.emit({"event": "warning", "message": "tied embeddings"})  # before start
    assert not log_dir.exists(), "nothing is written before the run starts"
    for e in events:
        first.emit(e)
    first.close()
    # resume from a checkpoint at step 8: steps 8..11 again, with other losses
    resumed = TensorBoardSink(log_dir, append=True)
    resumed.emit(
        {
            "event": "resume",
            "step": 8,
            "total_steps": 12,
            "path": str(tmp_path / "checkpoints/step-0000008"),
        }
    )
    for e in events:
        if e["event"] == "step" and e["step"] >= 8:
            resumed.emit(dict(e, loss=5.0))
    resumed.close()
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    assert "run/warning/text_summary" in acc.Tags()["tensors"]
    loss = {s.step: round(s.value, 4) for s in acc.Scalars("train/loss")}
    assert sorted(loss) == list(range(12))
    assert [loss[s] for s in range(12)] == [round(2.0 - 0.05 * s, 4) for s in range(8)] + [5.0] * 4


def test_resume_checkpoint_and_task_eval_lines():
    events = [
        {
            "event": "resume",
            "step": 8,
            "total_steps": 12,
            "path": "runs/x/checkpoints/step-0000008",
        },
        {"event": "checkpoint", "step": 10, "path": "runs/x/checkpoints/step-0000010"},
        {
            "event": "task_eval",
            "step": 12,
            "rows": 50,
            "kinds": ["generate"],
            "accuracy": 0.62,
            "dir": "runs/x/eval/step-0000012",
        },
    ]
    assert printed(events) == [
        "resume step=8 steps=12 from=runs/x/checkpoints/step-0000008",
        "ckpt   step=10 runs/x/checkpoints/step-0000010",
        "task   step=12 accuracy=0.6200 dir=runs/x/eval/step-0000012",
    ]
