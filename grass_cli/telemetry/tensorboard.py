"""TensorBoard sink: the same telemetry events as metrics.jsonl, as TensorBoard scalars.

Optional (`pip install 'grass-cli[tensorboard]'`): the import is checked when the
sink is built, so a missing package fails before minutes of model loading, and
the writer is created at the run's start (or resume) event, after the engine has
accepted the run dir (a refused run dir never gets a tensorboard/ folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from grass_cli.errors import GrassError
from grass_cli.telemetry import Event
from grass_cli.telemetry.sinks import MEMORY_FIELDS

# Step-event scalars: event key -> TensorBoard tag.
STEP_SCALARS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "grad_norm": "train/grad_norm",
    "tokens_per_s": "train/tokens_per_s",
    "step_time": "train/step_time_s",
    "trainable_params": "train/trainable_params",
}


class TensorBoardSink:
    """Writes RUN_DIR/tensorboard: losses, lr, memory (MiB), per-block MGN and p.

    Tags: train/*, eval/loss, eval/ppl, task_eval/<score>, probe/loss,
    memory/<field>_mib, importance/block_NN and probability/block_NN (written when
    they change); start / resume, switches (the active blocks), checkpoints,
    warnings and the summary as text.
    `append=False` removes event files of an earlier run in the same folder
    (the engine has already agreed to replace that run); a resumed run appends.
    """

    def __init__(self, log_dir: Path, append: bool = False):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise GrassError(
                "output.tensorboard is on but the tensorboard package is not installed",
                where="output.tensorboard",
                hint="pip install 'grass-cli[tensorboard]', or set output.tensorboard=false",
            ) from None
        self._writer_cls = SummaryWriter
        self.log_dir = Path(log_dir)
        self.append = append
        self._writer: Any = None
        self._pending: list[Event] = []  # warnings from setup, before start / resume
        self._last: dict[str, list] = {}

    def _open(self, event: Event) -> Any:
        """The writer, made at the run's first event (start, or resume at step N).

        A resumed run purges what the interrupted run logged at steps >= N, so
        TensorBoard shows one curve, not the old tail under the new one.
        """
        if not self.append and self.log_dir.is_dir():
            for old in self.log_dir.glob("events.out.tfevents.*"):
                old.unlink()
        purge = int(event["step"]) if event["event"] == "resume" else None
        return self._writer_cls(log_dir=str(self.log_dir), purge_step=purge)

    def emit(self, event: Event) -> None:
        if self._writer is None:
            if event["event"] not in ("start", "resume"):
                self._pending.append(event)
                return
            self._writer = self._open(event)
            pending, self._pending = self._pending, []
            self._write(event)
            for e in pending:
                self._write(e)
            return
        self._write(event)

    def _write(self, event: Event) -> None:
        kind = event["event"]
        w = self._writer
        if kind == "step":
            step = int(event["step"])
            for key, tag in STEP_SCALARS.items():
                if event.get(key) is not None:
                    w.add_scalar(tag, event[key], step)
            for key in MEMORY_FIELDS:
                if event.get(key) is not None:
                    w.add_scalar(
                        f"memory/{key.removesuffix('_bytes')}_mib", event[key] / 2**20, step
                    )
            w.add_scalar("train/active_blocks", len(event.get("active") or []), step)
            # MGN and p change only at EMA refreshes: writing them then (not every
            # step) keeps 80 blocks x 2 tags from costing more than the step itself.
            self._per_block(w, "importance", event.get("importance"), step)
            self._per_block(w, "probability", event.get("probabilities"), step)
        elif kind == "eval":
            w.add_scalar("eval/loss", event["eval_loss"], int(event["step"]))
            w.add_scalar("eval/ppl", event["eval_ppl"], int(event["step"]))
        elif kind == "task_eval":
            for key, value in event.items():
                if (
                    isinstance(value, (int, float))
                    and not isinstance(value, bool)
                    and key != "step"
                ):
                    w.add_scalar(f"task_eval/{key}", value, int(event["step"]))
        elif kind == "probe":
            w.add_scalar("probe/loss", event["loss"], int(event["probe_step"]))
        elif kind in ("start", "resume", "end"):
            rows = "\n".join(f"| {k} | {v} |" for k, v in event.items() if k != "event")
            w.add_text(f"run/{kind}", f"| field | value |\n|---|---|\n{rows}")
            w.flush()
        elif kind == "switch":
            text = f"active blocks {event['active']} (frozen {event.get('frozen')})"
            w.add_text("run/switch", text, int(event["step"]))
        elif kind == "checkpoint":
            w.add_text("run/checkpoint", str(event["path"]), int(event["step"]))
        elif kind == "warning":
            w.add_text("run/warning", str(event.get("message")))

    def _per_block(self, w: Any, name: str, values: list | None, step: int) -> None:
        if values is None or values == self._last.get(name):
            return
        self._last[name] = list(values)
        for i, value in enumerate(values):
            if value is not None:
                w.add_scalar(f"{name}/block_{i:02d}", value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
