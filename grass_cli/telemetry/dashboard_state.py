"""What the live dashboard shows, folded from telemetry events: no terminal, no Rich.

The engine reports facts per event (this step's loss, this step's active
blocks); anything cumulative (steps trained per block, loss trend, memory
peaks, the event log) is derived here, so the screen can be rebuilt from a
run's metrics.jsonl alone and tests can check the numbers without drawing.
Each event kind has one small handler; `update` only dispatches.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grass_cli.telemetry import Event
from grass_cli.telemetry.sinks import MEMORY_FIELDS, RunPeaks, StepClock, format_blocks

EVENT_LOG_LINES = 3
LOSS_WINDOW = 20  # steps in the loss sparkline


@dataclass
class DashboardState:
    """Everything the dashboard shows, updated from events by `update`."""

    run_name: str = ""
    run_dir: str = ""
    model: str = ""
    strategy: str = ""
    device: str = ""
    attention: str = ""  # the attention kernel (start event), shown beside the device
    gamma: int = 0
    num_blocks: int = 0
    total_steps: int = 0
    eval_rows: int = 0
    phase: str = "loading model and data"
    step: int = 0  # optimizer steps completed
    elapsed_s: float = 0.0
    loss: float | None = None
    losses: deque[float] = field(default_factory=lambda: deque(maxlen=LOSS_WINDOW))
    lr: float | None = None
    grad_norm: float | None = None
    tokens_total: int = 0
    next_switch: int | None = None
    importance: list[float | None] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    active: list[int] = field(default_factory=list)
    active_counts: list[int] = field(default_factory=list)
    memory: dict[str, int] = field(default_factory=dict)
    peaks: RunPeaks = field(default_factory=RunPeaks)
    clock: StepClock = field(default_factory=StepClock)
    evals: list[tuple[int, float]] = field(default_factory=list)
    events: deque[tuple[str, str]] = field(
        default_factory=lambda: deque(maxlen=EVENT_LOG_LINES)
    )  # (style, text)
    model_dir: str | None = None
    summary: dict[str, Any] | None = None

    def update(self, e: Event) -> None:
        """Fold one event in. Peaks and step timing see every event; kinds the
        dashboard has no handler for (a future engine's) are otherwise ignored."""
        self.peaks.observe(e)
        self.clock.observe(e)
        handler = HANDLERS.get(e["event"])
        if handler is not None:
            handler(self, e)

    @property
    def eta_s(self) -> float | None:
        return self.clock.eta(max(0, self.total_steps - self.step))

    @property
    def best_eval(self) -> tuple[int, float] | None:
        return min(self.evals, key=lambda p: p[1]) if self.evals else None

    def _log(self, text: str, style: str = "") -> None:
        self.events.append((style, text))

    def _blocks(self, n: int) -> None:
        """Size the per-block lists once the number of blocks is known.

        Only ever grows: a resumed run gets `resume` instead of `start`, and
        learns its block count from its first step's importance or active set.
        """
        if n > self.num_blocks:
            self.num_blocks = n
        if len(self.active_counts) < self.num_blocks:
            self.active_counts += [0] * (self.num_blocks - len(self.active_counts))

    # ------------------------------------------------------------- run lifecycle

    def _on_start(self, e: Event) -> None:
        self.run_dir = str(e.get("run_dir", ""))
        self.run_name = Path(self.run_dir).name or self.run_dir
        self.model = str(e.get("model", ""))
        self.strategy = str(e.get("strategy", ""))
        self.device = str(e.get("device", ""))
        self.attention = str(e.get("attention") or "")
        self.gamma = int(e.get("gamma") or 0)
        self.total_steps = int(e.get("total_steps") or 0)
        self.eval_rows = int(e.get("eval_rows") or 0)
        self._blocks(int(e.get("num_blocks") or 0))
        self.phase = "evaluating the untouched model" if self.eval_rows else "starting"
        processes = int(e.get("world_size") or 1)
        self._log(
            f"started: {self.num_blocks} blocks, {self.strategy}, {self.total_steps} steps "
            f"of {e.get('global_batch')} rows on {self.device}"
            + (f" x {e['world_size']} processes" if processes > 1 else "")
            + (" (sharded)" if e.get("sharding") == "fsdp" else "")
        )

    def _on_resume(self, e: Event) -> None:
        # RUN_DIR/checkpoints/step-N: the run's name is two folders up.
        self.run_dir = str(Path(str(e["path"])).parent.parent)
        self.run_name = Path(self.run_dir).name
        self.total_steps = int(e.get("total_steps") or self.total_steps)
        self.step = int(e["step"])
        self.phase = "resuming"
        self._log(f"resumed at step {self.step} from {e['path']}", "cyan")

    def _on_saved(self, e: Event) -> None:
        self.model_dir = str(e["path"])
        self._log(f"saved the model to {self.model_dir}", "cyan")

    def _on_end(self, e: Event) -> None:
        self.summary = dict(e)
        self.phase = "done"
        self.step = int(e.get("steps") or self.step)
        self.elapsed_s = float(e.get("elapsed_s") or self.elapsed_s)
        self.model_dir = e.get("model_dir") or self.model_dir

    # ------------------------------------------------------------------ training

    def _on_probe(self, e: Event) -> None:
        self.phase = f"probing {e['probe_step'] + 1}/{e['probe_steps']}"
        self.loss = e.get("loss")

    def _on_probe_done(self, e: Event) -> None:
        self.importance = list(e["importance"])
        self.probabilities = list(e["probabilities"])
        self._blocks(len(self.importance))
        self.phase = "training"
        top = format_blocks(list(e.get("ranking") or [])[:5])
        self._log(f"probing done: most important blocks {top}", "cyan")

    def _on_switch(self, e: Event) -> None:
        step = int(e["step"])
        self.active = sorted(int(b) for b in e["active"])
        self.next_switch = e.get("next_switch")
        self.phase = "training"
        frozen = sorted(
            int(name.split(".", 1)[1])
            for name in e.get("frozen") or []
            if name.startswith("block.")
        )
        was = f" (froze {format_blocks(frozen)})" if frozen else ""
        self._log(f"step {step}: training blocks {format_blocks(self.active)}{was}", "green")

    def _on_step(self, e: Event) -> None:
        self.step = int(e["step"]) + 1
        self.total_steps = int(e.get("total_steps") or self.total_steps)
        self.elapsed_s = float(e.get("elapsed_s") or 0.0)
        self.loss = e.get("loss")
        if self.loss is not None:
            self.losses.append(float(self.loss))
        self.lr = e.get("lr")
        self.grad_norm = e.get("grad_norm")
        self.tokens_total = int(e.get("tokens_total") or self.tokens_total)
        self.next_switch = e.get("next_switch")
        self._count_active(e)
        self.memory = {k: int(e[k]) for k in MEMORY_FIELDS if e.get(k) is not None}
        done = self.step >= self.total_steps
        self.phase = ("final eval" if self.eval_rows else "finishing") if done else "training"

    def _count_active(self, e: Event) -> None:
        """This step's active set, the latest importance, and one more step per active block.

        The step event is the only count: switches say which blocks will train,
        steps say which did (a resumed run counts from its first step on).
        """
        self.active = sorted(int(b) for b in e.get("active") or [])
        if e.get("importance") is not None:
            self.importance = list(e["importance"])
        if e.get("probabilities") is not None:
            self.probabilities = list(e["probabilities"])
        self._blocks(max([len(self.importance)] + [b + 1 for b in self.active]))
        for b in self.active:
            self.active_counts[b] += 1

    # ----------------------------------------------------------- evals and notes

    def _on_eval(self, e: Event) -> None:
        step, loss = int(e["step"]), float(e["eval_loss"])
        self.evals.append((step, loss))
        if self.phase.startswith("evaluating"):
            self.phase = "training"
        self._log(f"eval at step {step}: loss {loss:.4f}, ppl {e.get('eval_ppl', 0):.2f}")

    def _on_task_eval(self, e: Event) -> None:
        scores = ", ".join(
            f"{key.replace('_', ' ')} {e[key]:.4f}"
            for key in ("accuracy", "choice_accuracy", "loss")
            if isinstance(e.get(key), (int, float))
        )
        self._log(f"task eval at step {e.get('step')}: {scores or 'done'}")

    def _on_checkpoint(self, e: Event) -> None:
        self._log(f"checkpoint at step {e['step']}: {e['path']}", "cyan")

    def _on_warning(self, e: Event) -> None:
        self._log(f"warning: {e.get('message')}", "yellow")


# One handler per event kind, listed so the kinds the dashboard understands can
# be read in one place.
HANDLERS: dict[str, Callable[[DashboardState, Event], None]] = {
    "start": DashboardState._on_start,
    "resume": DashboardState._on_resume,
    "probe": DashboardState._on_probe,
    "probe_done": DashboardState._on_probe_done,
    "switch": DashboardState._on_switch,
    "step": DashboardState._on_step,
    "eval": DashboardState._on_eval,
    "task_eval": DashboardState._on_task_eval,
    "checkpoint": DashboardState._on_checkpoint,
    "warning": DashboardState._on_warning,
    "saved": DashboardState._on_saved,
    "end": DashboardState._on_end,
}


def state_from_events(events: list[Event]) -> DashboardState:
    """Replay a run's events (e.g. its metrics.jsonl) into the dashboard's state."""
    state = DashboardState()
    for e in events:
        state.update(e)
    return state
