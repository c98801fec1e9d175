"""Sinks that write events: metrics.jsonl and plain log lines.

Also the small helpers every console sink shares (byte and duration formats, the
memory fields of a step event, peak tracking, ETA), so the plain printer, the
dashboard and the end-of-run summary say the same numbers the same way.
"""

from __future__ import annotations

import json
import math
from collections import deque
from pathlib import Path
from typing import IO, Any

from grass_cli.telemetry import Event


def _clean(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null so every line parses everywhere."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


class JsonlSink:
    """Every event as one JSON line, flushed at once so a crash loses nothing."""

    def __init__(self, path: Path, append: bool = False):
        self.path = path
        self._f = open(path, "a" if append else "w", encoding="utf-8")  # noqa: SIM115

    def emit(self, event: Event) -> None:
        self._f.write(json.dumps(_clean(event)) + "\n")
        self._f.flush()

    def flush(self) -> None:
        self._f.flush()

    def tell(self) -> int:
        """Byte offset of the end of the file: a checkpoint records it so a resume can
        cut the lines written after the checkpoint."""
        return self._f.tell()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


# ------------------------------------------------------------------ shared helpers

# Memory fields of a step event, in bytes, with their short names for one-line
# output. Optimizer states are split by where they live, so offloading shows as
# bytes moving from the device to cpu / disk.
MEMORY_FIELDS: dict[str, str] = {
    "weights_bytes": "weights",
    "grad_bytes": "grads",
    "optimizer_state_bytes": "optim",
    "optimizer_state_offload_cpu_bytes": "optim_cpu",
    "optimizer_state_offload_disk_bytes": "optim_disk",
    "master_weight_bytes": "master",
    "rss": "rss",
    "cuda_allocated": "cuda_alloc",
    "cuda_reserved": "cuda_reserved",
    "cuda_peak": "cuda_peak",
}
CUDA_FIELDS = ("cuda_allocated", "cuda_reserved", "cuda_peak")


def format_bytes(n: int | float | None) -> str:
    """Binary units with three significant digits: '0 B', '54.0 MiB', '2.07 GiB'."""
    if n is None:
        return "-"
    n = float(n)
    units = ("B", "KiB", "MiB", "GiB", "TiB")
    for unit in units:
        if abs(n) < 1024 or unit == units[-1]:
            break
        n /= 1024
    if unit == "B":
        return f"{n:.0f} B"
    return f"{n:.2f} {unit}" if abs(n) < 10 else f"{n:.1f} {unit}"


def format_duration(seconds: float | None) -> str:
    """'42s', '3:07', '1:02:03': short enough for a header, exact enough for a log."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def format_blocks(blocks: list[int]) -> str:
    return ",".join(str(b) for b in blocks)


class RunPeaks:
    """Peak of every memory field over a run's probe and step events.

    The engine reports memory as it is at each step; the end-of-run summary wants
    the worst case, which no single event carries, so each console sink keeps it.
    """

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}

    def observe(self, event: Event) -> None:
        if event["event"] not in ("step", "probe"):
            return
        for key in MEMORY_FIELDS:
            value = event.get(key)
            if value is not None and value >= self.peaks.get(key, -1):
                self.peaks[key] = int(value)


class StepClock:
    """ETA from the recent steps' own durations.

    Elapsed time includes model loading, evals and probing; extrapolating from it
    would be wrong early in a run. A window of recent step times follows speed
    changes (e.g. more optimizer state being fetched) without jumping every step.
    """

    def __init__(self, window: int = 20) -> None:
        self._times: deque[float] = deque(maxlen=window)
        self._tokens: deque[int] = deque(maxlen=window)

    def observe(self, event: Event) -> None:
        if event["event"] == "step":
            self._times.append(float(event.get("step_time") or 0.0))
            self._tokens.append(int(event.get("tokens") or 0))

    def eta(self, remaining_steps: int) -> float | None:
        if not self._times:
            return None
        return remaining_steps * sum(self._times) / len(self._times)

    def tokens_per_s(self) -> float | None:
        total = sum(self._times)
        return sum(self._tokens) / total if total > 0 else None


def _fmt_loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


# -------------------------------------------------------------------- plain lines


def _batch_parts(e: Event) -> str:
    """How the global batch is made, when it is more than one micro batch."""
    world, accum = int(e.get("world_size") or 1), int(e.get("grad_accum") or 1)
    if world == 1 and accum == 1:
        return ""
    parts = [str(e.get("micro_batch"))]
    if accum > 1:
        parts.append(f"{accum} accum")
    if world > 1:
        sharded = ", sharded" if e.get("sharding") == "fsdp" else ""
        host = ", shards on the host" if e.get("cpu_offload") else ""
        parts.append(f"{world} processes{sharded}{host}")
    return f" ({' x '.join(parts)})"


class PlainPrinter:
    """Log lines for pipes, files and `--no-live`: one line every `every` steps.

    Besides the step lines it prints only what happens rarely and matters in a log
    (start or resume, probing progress at the same cadence, evals, checkpoints,
    warnings, the saved model) and the end-of-run summary. Switches are folded into the step lines
    (`active=` plus `switched@STEP`), so a switch every step cannot flood the log.
    `quiet` prints the end-of-run summary only.
    """

    def __init__(self, stream: IO[str], every: int = 1, quiet: bool = False):
        self.stream = stream
        self.every = max(1, every)
        self.quiet = quiet
        self.peaks = RunPeaks()
        self.clock = StepClock()
        self._switched_at: int | None = None

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def emit(self, event: Event) -> None:
        self.peaks.observe(event)
        self.clock.observe(event)
        kind = event["event"]
        if kind == "switch":
            self._switched_at = int(event["step"])
        if self.quiet and kind != "end":
            return
        text = self.format(event)
        if text is not None:
            self._line(text)

    def format(self, e: Event) -> str | None:
        """The text for one event (several lines for `end`), or None to stay silent."""
        kind = e["event"]
        if kind == "start":
            return (
                f"start  model={e['model']} blocks={e['num_blocks']} strategy={e['strategy']} "
                f"steps={e['total_steps']} batch={e['global_batch']}{_batch_parts(e)} "
                f"train_rows={e['train_rows'] if e['train_rows'] is not None else 'streamed'} "
                f"device={e['device']}"
                + (f" attention={e['attention']}" if e.get("attention") else "")
                + (f"\ngamma  {e['gamma']}: {e['gamma_auto']}" if e.get("gamma_auto") else "")
            )
        if kind == "probe":
            done = e["probe_step"] + 1
            if done % self.every and done != e["probe_steps"]:
                return None
            return f"probe  {done}/{e['probe_steps']} loss={e['loss']:.4f}"
        if kind == "probe_done":
            return (
                f"probe  done; MGN ranks (most important first): {format_blocks(e['ranking'][:8])}"
            )
        if kind == "step":
            return self._step_line(e)
        if kind == "eval":
            return f"eval   step={e['step']} eval_loss={e['eval_loss']:.4f} ppl={e['eval_ppl']:.2f}"
        if kind == "resume":
            return f"resume step={e['step']} steps={e['total_steps']} from={e['path']}"
        if kind == "task_eval":
            scores = [
                f"{key}={e[key]:.4f}"
                for key in ("accuracy", "choice_accuracy", "loss")
                if isinstance(e.get(key), (int, float))
            ]
            return " ".join([f"task   step={e.get('step')}", *scores, f"dir={e.get('dir')}"])
        if kind == "checkpoint":
            took = ""
            if "seconds" in e:
                size = format_bytes(int(e.get("bytes") or 0)).replace(" ", "")
                took = f" ({size} in {e['seconds']:.1f}s{', light' if e.get('light') else ''})"
            return f"ckpt   step={e['step']} {e['path']}{took}"
        if kind == "warning":
            return f"warning {e['message']}"
        if kind == "saved":
            return f"saved  {e['path']}"
        if kind == "end":
            return "\n".join(self.summary_lines(e))
        return None

    def _step_line(self, e: Event) -> str | None:
        step = e["step"] + 1
        if step % self.every and step != e["total_steps"]:
            return None
        mem = format_bytes(e["cuda_allocated"] if "cuda_allocated" in e else e["rss"])
        line = (
            f"step {step:>5}/{e['total_steps']} loss={e['loss']:.4f} lr={e['lr']:.2e} "
            f"gnorm={e['grad_norm']:.3f} tok/s={e['tokens_per_s']:.0f} "
            f"active={format_blocks(e['active'])} mem={mem.replace(' ', '')}"
        )
        if step < e["total_steps"]:
            line += f" eta={format_duration(self.clock.eta(e['total_steps'] - step))}"
        if self._switched_at is not None:
            line += f" switched@{self._switched_at}"
            self._switched_at = None
        return line

    def summary_lines(self, e: Event) -> list[str]:
        """`done` (time, tokens, losses), `peak` (memory by kind), `files` (where)."""
        best, final_eval = e.get("best_eval_loss"), e.get("final_eval_loss")
        done = (
            f"done   steps={e['steps']} time={e['elapsed_s']:.1f}s tokens={e['tokens']} "
            f"final_loss={_fmt_loss(e.get('final_loss'))}"
            + (f" eval_loss={final_eval:.4f}" if final_eval is not None else "")
            + (f" best_eval_loss={best:.4f}" if best is not None else "")
            + f" peak_rss={format_bytes(e['peak_rss']).replace(' ', '')}"
            + f" model={e.get('model_dir') or '-'}"
        )
        peaks = self.peaks.peaks
        peak = "peak   " + " ".join(
            f"{short}={format_bytes(peaks[k]).replace(' ', '')}"
            for k, short in MEMORY_FIELDS.items()
            if k in peaks
        )
        run_dir = Path(e["run_dir"])
        files = (
            f"files  run_dir={run_dir} metrics={run_dir / 'metrics.jsonl'} "
            f"summary={run_dir / 'summary.json'} recipe={run_dir / 'recipe.yaml'}"
        )
        lines = [done, peak, files] if peaks else [done, files]
        if e.get("sigterm_needs_s"):
            lines.append(f"preempt {preemption_advice(e)}")
        return lines

    def close(self) -> None:
        self.stream.flush()


def preemption_advice(e: Event) -> str:
    """How long a SIGTERM needs here (the slowest step, then a checkpoint), and the
    grace period to ask a scheduler for."""
    need = float(e["sigterm_needs_s"])
    grace = grace_period_s(need)
    return (
        f"a SIGTERM needs up to {need:.1f}s here (step {e['slowest_step_s']:.1f}s + checkpoint "
        f"{e['slowest_checkpoint_s']:.1f}s): allow {grace}s (SLURM --signal=TERM@{grace}, "
        f"Kubernetes terminationGracePeriodSeconds: {grace})"
    )


def grace_period_s(need_s: float) -> int:
    """A grace period with room for a slower step or disk: 1.5x, in 10 s steps."""
    return max(10, math.ceil(need_s * 1.5 / 10) * 10)
