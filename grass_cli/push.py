"""`grass push`'s library side: what a run uploads to the Hugging Face Hub, and the
upload itself.

A push is planned first (`plan_push`): every file of the trained model, a model card
written from the run (README.md: base model, strategy, data, schedule, results,
the importance heatmap, the recipe), and the heatmap image. A dry run shows the
plan; the upload is one commit of exactly those files (huggingface_hub), into a
repo created if missing. The token is huggingface_hub's own (HF_TOKEN, or
`hf auth login`'s stored one); offline (HF_HUB_OFFLINE) and without a token the
push stops with one message before anything is sent.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grass_cli.errors import GrassError

CARD = "README.md"
HEATMAP = "importance_heatmap.png"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class UploadPlan:
    """The files one push sends (local path, path in the repo) and the card's text."""

    repo: str
    private: bool
    files: list[tuple[Path, str]] = field(default_factory=list)
    card: str = ""

    @property
    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p, _ in self.files) + len(self.card.encode())

    def listing(self) -> list[tuple[str, int]]:
        """(path in the repo, bytes) of everything the commit holds, card included."""
        rows = [(dest, p.stat().st_size) for p, dest in self.files]
        return sorted([*rows, (CARD, len(self.card.encode()))])


def plan_push(target: str, repo: str, private: bool = False) -> UploadPlan:
    """The upload of a run's final model (or a model folder inside a run: a
    checkpoint), with a card written from what the run recorded."""
    if not REPO_ID.match(repo):
        raise GrassError(
            f"{repo!r} is not a Hub repo id", where="--repo", hint="give it as ORG/NAME"
        )
    run_dir, model_dir = _locate(Path(target).expanduser(), target)
    plan = UploadPlan(repo, private)
    for p in sorted(model_dir.rglob("*")):
        if p.is_file() and p.name != CARD:  # (the card is ours)
            plan.files.append((p, p.relative_to(model_dir).as_posix()))
    heatmap = run_dir / "plots" / HEATMAP if run_dir is not None else None
    if heatmap is not None and heatmap.is_file():
        plan.files.append((heatmap, HEATMAP))
    plan.card = model_card(repo, run_dir, model_dir, heatmap is not None and heatmap.is_file())
    return plan


def _locate(p: Path, target: str) -> tuple[Path | None, Path]:
    """(the run folder if any, the model folder to upload)."""
    if (p / "config.json").is_file():  # a model folder: final/ or a checkpoint of a run
        for up in (p.parent, p.parent.parent, p.parent.parent.parent):
            if (up / "recipe.yaml").is_file():
                return up, p
        return None, p
    if (p / "recipe.yaml").is_file():
        if not (p / "final" / "config.json").is_file():
            raise GrassError(
                "the run has no final model (final/config.json)",
                where=target,
                hint="the run may not have finished; push a checkpoint folder instead",
            )
        return p, p / "final"
    raise GrassError(
        "not a run folder (recipe.yaml + final/) or a model folder (config.json)",
        where=target,
        hint="pass the output.dir of a `grass train` run, or a checkpoint folder",
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def model_card(repo: str, run_dir: Path | None, model_dir: Path, heatmap: bool) -> str:
    """README.md for the repo: YAML metadata the Hub reads (base model, library,
    tags), then what was trained and how, its results, and the recipe."""
    from grass_cli.presets import find_preset

    recipe_text, recipe = "", None
    if run_dir is not None:
        from grass_cli.recipe import load_recipe

        recipe_text = (run_dir / "recipe.yaml").read_text(encoding="utf-8")
        recipe = load_recipe(run_dir / "recipe.yaml")
    summary = _read_json(run_dir / "summary.json") if run_dir is not None else None
    base = recipe.model.path if recipe is not None else None
    preset = find_preset(base) if base else None
    base_id = preset.hub_id if preset is not None else base
    hub_base = base_id is not None and REPO_ID.match(base_id) and not Path(base_id).exists()
    strategy = recipe.sampler.strategy if recipe is not None else None
    meta = ["---", "library_name: transformers", "tags:", "- grass-cli", "- fine-tuned"]
    if strategy:
        meta.append(f"- {strategy}")
    if hub_base:
        meta.append(f"base_model: {base_id}")
    meta.append("---")
    lines = [*meta, "", f"# {repo.split('/')[1]}", ""]
    what = f"`{base}`" if base else "a base model"
    lines.append(
        f"Fine-tuned from {what} with GRASS CLI (`grass train`)"
        + (f", strategy `{strategy}`." if strategy else ".")
    )
    if recipe is not None:
        s, t, o, d = recipe.sampler, recipe.training, recipe.optimizer, recipe.data
        rows = [
            ("strategy", strategy),
            ("blocks trained at once (gamma)", s.gamma if strategy != "full" else "all"),
            ("optimizer state", o.state_policy),
            ("learning rate", f"{o.lr:g} ({t.lr_scheduler}, {t.warmup_steps} warm-up steps)"),
            ("steps", summary.get("steps") if summary else t.max_steps),
            ("batch", f"{t.micro_batch_size} x {t.grad_accum_steps} accumulation"),
            ("max length", d.max_length),
            ("training data", _data_sources(d)),
            ("seed", t.seed),
        ]
        lines += ["", "## Training", "", "| | |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in rows if v is not None]
    results = _results(run_dir, model_dir, summary)
    if results:
        lines += ["", "## Results", "", "| | |", "|---|---|", *results]
    if heatmap:
        lines += ["", "## Layer importance", "", f"![importance over training]({HEATMAP})"]
    if recipe_text:
        lines += ["", "## Recipe", "", "```yaml", recipe_text.rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _data_sources(d: Any) -> str:
    from grass_cli.data.build import train_specs
    from grass_cli.data.sources import as_spec

    return ", ".join(f"`{as_spec(src).path}`" for _, src in train_specs(d))


def _results(run_dir: Path | None, model_dir: Path, summary: dict | None) -> list[str]:
    """Table rows: the run's eval losses, and every `grass eval` result it holds."""
    rows = []
    if summary:
        for key, label in (
            ("final_eval_loss", "final eval loss"),
            ("best_eval_loss", "best eval loss"),
        ):
            if summary.get(key) is not None:
                rows.append(f"| {label} | {summary[key]:.4f} |")
    if run_dir is not None:
        for res_file in sorted((run_dir / "eval").glob("**/result.json")):
            res = _read_json(res_file) or {}
            where = res_file.parent.relative_to(run_dir).as_posix()
            for key in ("accuracy", "loss", "perplexity"):
                if isinstance(res.get(key), (int, float)):
                    rows.append(f"| {key} ({where}) | {res[key]:.4f} |")
        for res_file in sorted((run_dir / "eval").glob("**/harness.json")):
            tasks = (_read_json(res_file) or {}).get("tasks") or {}
            for task, metrics in sorted(tasks.items()):
                for key, value in metrics.items():
                    if isinstance(value, (int, float)) and not key.endswith("_stderr"):
                        err = metrics.get(f"{key}_stderr")
                        spread = f" ± {err:.4f}" if isinstance(err, (int, float)) else ""
                        rows.append(
                            f"| {task} {key} (lm-evaluation-harness) | {value:.4f}{spread} |"
                        )
    return rows


def hub_token() -> str:
    """The token an upload would use; one message offline or without one (checked
    before anything is read or sent)."""
    from grass_cli.hub import hub_offline

    if hub_offline():
        raise GrassError(
            "HF_HUB_OFFLINE is set: nothing can be uploaded",
            where="--repo",
            hint="unset HF_HUB_OFFLINE where there is network, or use --dry-run to see the plan",
        )
    from huggingface_hub import get_token

    token = get_token()
    if token is None:
        raise GrassError(
            "no Hugging Face token: set HF_TOKEN or run `hf auth login`",
            where="--repo",
            hint="a token with write access (huggingface.co/settings/tokens)",
        )
    return token


def push(plan: UploadPlan, token: str) -> str:
    """Create the repo if needed and upload the plan's files as one commit; returns
    the repo's URL. Network and permission failures are one message each."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from grass_cli.hub import first_line

    api = HfApi(token=token)
    ops = [CommitOperationAdd(path_in_repo=dest, path_or_fileobj=str(p)) for p, dest in plan.files]
    ops.append(CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=plan.card.encode()))
    try:
        url = api.create_repo(plan.repo, private=plan.private, exist_ok=True)
        api.create_commit(plan.repo, operations=ops, commit_message="Upload with grass push")
    except Exception as e:  # requests / hub errors: what the hub said, in one line
        raise GrassError(
            f"the upload to {plan.repo} failed: {first_line(e)}",
            where="--repo",
            hint="check the token's write access and the network, then push again "
            "(an interrupted push sends its files again)",
        ) from None
    return str(url)
