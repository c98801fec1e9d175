"""Weights & Biases sink: TensorBoard's scalars, block history as W&B charts, recipe as config.

Optional (`pip install 'grass-cli[wandb]'`): pre-flight checks the package (and,
for online mode, that a login exists) before the model loads, and the W&B run is
created at the run's start or resume event, after the engine has accepted the
run folder, so a refused start leaves nothing in W&B.

Every chart's x-axis is the optimizer step (`train/step`, or `probe/step` for
probing), logged as a metric rather than as W&B's internal `_step`: W&B drops a
row whose `_step` is not above the last one, which a resumed run (steps after
its checkpoint again) and probing (its own step count) would otherwise hit.
The W&B run id lives in RUN_DIR/wandb-run-id, so `--resume` continues that run.
"""

from __future__ import annotations

import importlib.util
import netrc
import os
import secrets
import string
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from grass_cli.atomic import write_atomic_text
from grass_cli.errors import GrassError
from grass_cli.hub import first_line
from grass_cli.recipe.wandb_config import WandbConfig
from grass_cli.telemetry import Event
from grass_cli.telemetry.sinks import MEMORY_FIELDS
from grass_cli.telemetry.tensorboard import STEP_SCALARS
from grass_cli.telemetry.wandb_history import BlockHistory

RUN_ID_FILE = "wandb-run-id"
# Chart groups whose x-axis is the optimizer step (probe/* has its own).
STEP_GROUPS = ("train", "eval", "task_eval", "memory", "importance", "probability", "blocks")


def effective_mode(cfg: WandbConfig) -> str:
    """The recipe's mode, else WANDB_MODE (W&B's own variable), else online."""
    mode = cfg.mode or os.environ.get("WANDB_MODE") or "online"
    return {"dryrun": "offline", "run": "online"}.get(mode, mode)


def _has_login() -> bool:
    """Whether W&B will find credentials without asking: WANDB_API_KEY, an identity
    token file, or a .netrc entry for the server (what `wandb login` writes).

    Online mode without one would open an interactive prompt in the middle of the
    dashboard (or fail after the model has loaded)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    home = Path.home()
    for path in (os.environ.get("NETRC"), home / ".netrc", home / "_netrc"):
        if path and Path(path).is_file():
            try:
                return netrc.netrc(str(path)).authenticators(host or "") is not None
            except (netrc.NetrcParseError, OSError):
                return True  # W&B may read what the stdlib cannot: let W&B decide
    return False


def check_wandb(cfg: WandbConfig) -> None:
    """Pre-flight: the package is installed, and online mode has a login."""
    mode = effective_mode(cfg)
    if mode == "disabled":
        return
    if importlib.util.find_spec("wandb") is None:
        raise GrassError(
            "output.wandb is set but the wandb package is not installed",
            where="output.wandb",
            hint="pip install 'grass-cli[wandb]', or remove output.wandb",
        )
    if mode == "online" and not _has_login():
        raise GrassError(
            "W&B logs online, but no W&B login was found (WANDB_API_KEY, ~/.netrc)",
            where="output.wandb.mode: " + (cfg.mode or "null (WANDB_MODE unset: online)"),
            hint="run `wandb login` or set WANDB_API_KEY; or set output.wandb.mode: offline "
            "and upload later with `wandb sync RUN_DIR/wandb/offline-run-*`",
        )


def _new_run_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


class WandbSink:
    """Logs a run to W&B: TensorBoard's scalars, the block history, the summary.

    Scalars (at `train/step`): train/* (loss, lr, grad_norm, tokens_per_s,
    step_time_s, trainable_params, active_blocks), memory/<field>_mib, eval/loss,
    eval/ppl, task_eval/<score>, importance/block_NN and probability/block_NN when
    they change; probe/loss at `probe/step`. At the end (or when an interrupted
    run closes): blocks/history (a table of step, block, MGN, p, active),
    blocks/importance (every block's MGN in one chart), blocks/active_counts (a
    bar chart) and blocks/importance_heatmap (blocks x steps, active cells marked).
    `config` (the resolved recipe) becomes the W&B run's config, with the start
    event's facts under `run`. Mode disabled: nothing is imported or written.
    """

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict[str, Any]):
        self.cfg = cfg
        self.mode = effective_mode(cfg)
        self.run_dir = Path(run_dir)
        self.config = config
        self._wandb: Any = None
        if self.mode != "disabled":
            try:
                import wandb
            except ImportError:
                raise GrassError(
                    "output.wandb is set but the wandb package is not installed",
                    where="output.wandb",
                    hint="pip install 'grass-cli[wandb]', or remove output.wandb",
                ) from None
            self._wandb = wandb
        self._run: Any = None
        self._pending: list[Event] = []  # warnings from setup, before start / resume
        self._last: dict[str, list] = {}
        self.history = BlockHistory()
        self._resumed = False
        self._ended = False

    def emit(self, event: Event) -> None:
        if self._wandb is None:
            return
        if self._run is None:
            if event["event"] not in ("start", "resume"):
                self._pending.append(event)
                return
            self._run = self._open(event)
            self._resumed = event["event"] == "resume"
            pending, self._pending = self._pending, []
            for e in pending:
                self._write(e)
            return
        self._write(event)

    def _run_id(self, event: Event) -> str:
        """The W&B run to continue on resume: this folder's, else (resuming into a
        new folder) the one of the run the checkpoint came from; else a new one."""
        if event["event"] == "resume":
            origin = Path(str(event["path"])).resolve().parent.parent
            for folder in (self.run_dir, origin):
                try:
                    run_id = (folder / RUN_ID_FILE).read_text(encoding="utf-8").strip()
                except OSError:
                    continue
                if run_id:
                    return run_id
        return _new_run_id()

    def _open(self, event: Event) -> Any:
        """The W&B run, made (or continued) at the run's first event."""
        wb, cfg = self._wandb, self.cfg
        run_id = self._run_id(event)
        folder = Path(cfg.dir) if cfg.dir else self.run_dir
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic_text(self.run_dir / RUN_ID_FILE, run_id + "\n")
        try:
            run = wb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=cfg.name,
                group=cfg.group,
                tags=list(cfg.tags) or None,
                notes=cfg.notes,
                mode=self.mode,
                dir=str(folder),
                id=run_id,
                resume="allow",
                # the library never prints, and must not wrap the dashboard's stdout
                settings=wb.Settings(silent=True, console="off"),
            )
        except wb.errors.Error as e:
            raise GrassError(
                f"cannot start the W&B run: {first_line(e)}",
                where="output.wandb",
                hint="check output.wandb.project / entity and your login, or set "
                "output.wandb.mode: offline (and upload later with `wandb sync`)",
            ) from None
        facts = {k: v for k, v in event.items() if k != "event"}
        run.config.update({**self.config, "run": facts}, allow_val_change=True)
        run.define_metric("train/step")
        run.define_metric("probe/step")
        for group in STEP_GROUPS:
            run.define_metric(f"{group}/*", step_metric="train/step", step_sync=True)
        run.define_metric("probe/*", step_metric="probe/step", step_sync=True)
        return run

    def _write(self, event: Event) -> None:
        kind, run = event["event"], self._run
        if kind == "step":
            self._log_step(event)
        elif kind == "eval":
            step = int(event["step"])
            run.log(
                {"train/step": step, "eval/loss": event["eval_loss"], "eval/ppl": event["eval_ppl"]}
            )
        elif kind == "task_eval":
            scores = {
                f"task_eval/{k}": v
                for k, v in event.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
            }
            run.log({"train/step": int(event["step"]), **scores})
        elif kind == "probe":
            run.log({"probe/step": int(event["probe_step"]), "probe/loss": event["loss"]})
        elif kind == "checkpoint":
            run.summary["checkpoint"] = str(event["path"])
        elif kind == "warning":
            run.summary["last_warning"] = str(event.get("message"))
        elif kind == "end":
            run.summary.update({k: v for k, v in event.items() if k != "event" and v is not None})
            self._log_blocks()
            self._ended = True

    def _log_step(self, event: Event) -> None:
        step = int(event["step"])
        row: dict[str, Any] = {"train/step": step}
        for key, tag in STEP_SCALARS.items():
            if event.get(key) is not None:
                row[tag] = event[key]
        for key in MEMORY_FIELDS:
            if event.get(key) is not None:
                row[f"memory/{key.removesuffix('_bytes')}_mib"] = event[key] / 2**20
        row["train/active_blocks"] = len(event.get("active") or [])
        # per-block series only when they change (at EMA refreshes), as in TensorBoard
        for name, key in (("importance", "importance"), ("probability", "probabilities")):
            values = event.get(key)
            if values is not None and values != self._last.get(name):
                self._last[name] = list(values)
                row.update(
                    {f"{name}/block_{i:02d}": v for i, v in enumerate(values) if v is not None}
                )
        self.history.add(event)
        self._run.log(row)

    def _full_history(self) -> BlockHistory:
        """The whole run's block history. A resumed run's steps before its checkpoint
        were seen by another process: they are in metrics.jsonl (continued exactly
        at the checkpoint), read back once, at the end."""
        if not self._resumed:
            return self.history
        from grass_cli.plots import load_metrics, step_events

        try:
            steps = step_events(load_metrics(self.run_dir))
        except (GrassError, OSError):
            return self.history
        history = BlockHistory()
        for event in steps:
            history.add(event)
        return history

    def _log_blocks(self) -> None:
        """The block history as W&B charts, logged at the last step."""
        h, wb = self._full_history(), self._wandb
        if not h.steps:
            return
        picked = h.picked_changes()
        charts: dict[str, Any] = {
            "train/step": h.steps[-1]["step"],
            "blocks/history": wb.Table(
                columns=["step", "block", "importance", "probability", "active"],
                data=h.table_rows(picked),
            ),
            "blocks/active_counts": wb.plot.bar(
                wb.Table(
                    columns=["block", "steps trained"],
                    data=[[b, c] for b, c in enumerate(h.active_counts())],
                ),
                "block",
                "steps trained",
                title="Steps trained per block",
            ),
        }
        series = h.importance_series(picked)
        if series:
            charts["blocks/importance"] = wb.plot.line_series(
                xs=[xs for _, xs, _ in series],
                ys=[ys for _, _, ys in series],
                keys=[f"block_{b:02d}" for b, _, _ in series],
                title="MGN by block",
                xname="step",
            )
        with tempfile.TemporaryDirectory() as tmp:
            from grass_cli.plots import plot_importance_heatmap

            if series:  # (the heatmap needs a known MGN somewhere)
                png = plot_importance_heatmap(h.steps, Path(tmp) / "importance_heatmap.png")
                charts["blocks/importance_heatmap"] = wb.Image(str(png))
            self._run.log(charts)

    def close(self) -> None:
        if self._run is None:
            return
        run, self._run = self._run, None
        try:
            if not self._ended:  # interrupted or failed: the charts so far
                self._run = run
                self._log_blocks()
        finally:
            self._run = None
            run.finish(exit_code=0 if self._ended else 1)
