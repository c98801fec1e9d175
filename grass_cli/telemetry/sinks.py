"""Sinks that write events: metrics.jsonl and plain log lines."""

from __future__ import annotations

import json
import math
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


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}G"


def format_blocks(blocks: list[int]) -> str:
    return ",".join(str(b) for b in blocks)


class PlainPrinter:
    """One line per `every` steps plus the events that matter, for logs and pipes."""

    def __init__(self, stream: IO[str], every: int = 1, quiet: bool = False):
        self.stream = stream
        self.every = max(1, every)
        self.quiet = quiet

    def _line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def emit(self, event: Event) -> None:
        kind = event["event"]
        if self.quiet and kind != "end":
            return
        line = self.format(event)
        if line is not None:
            self._line(line)

    def format(self, e: Event) -> str | None:
        kind = e["event"]
        if kind == "start":
            return (
                f"start  model={e['model']} blocks={e['num_blocks']} strategy={e['strategy']} "
                f"steps={e['total_steps']} batch={e['global_batch']} "
                f"train_rows={e['train_rows']} device={e['device']}"
            )
        if kind == "probe":
            return f"probe  {e['probe_step'] + 1}/{e['probe_steps']} loss={e['loss']:.4f}"
        if kind == "probe_done":
            return (
                f"probe  done; MGN ranks (most important first): {format_blocks(e['ranking'][:8])}"
            )
        if kind == "switch":
            return (
                f"switch step={e['step']} active={format_blocks(e['active'])} "
                f"frozen={format_blocks(e['frozen'])}"
            )
        if kind == "step":
            step = e["step"] + 1
            if step % self.every and step != e["total_steps"]:
                return None
            mem = _gib(e.get("cuda_allocated")) if "cuda_allocated" in e else _gib(e["rss"])
            return (
                f"step {step:>5}/{e['total_steps']} loss={e['loss']:.4f} lr={e['lr']:.2e} "
                f"gnorm={e['grad_norm']:.3f} tok/s={e['tokens_per_s']:.0f} "
                f"active={format_blocks(e['active'])} mem={mem}"
            )
        if kind == "eval":
            return f"eval   step={e['step']} eval_loss={e['eval_loss']:.4f} ppl={e['eval_ppl']:.2f}"
        if kind == "warning":
            return f"warning {e['message']}"
        if kind == "saved":
            return f"saved  {e['path']}"
        if kind == "end":
            best = e.get("best_eval_loss")
            return (
                f"done   steps={e['steps']} time={e['elapsed_s']:.1f}s tokens={e['tokens']} "
                f"final_loss={e['final_loss']:.4f}"
                + (f" eval_loss={e['final_eval_loss']:.4f}" if e.get("final_eval_loss") else "")
                + (f" best_eval_loss={best:.4f}" if best is not None else "")
                + f" peak_rss={_gib(e['peak_rss'])} model={e.get('model_dir') or '-'}"
            )
        return None

    def close(self) -> None:
        self.stream.flush()
