"""What `grass eval TARGET` evaluates: the model a target names, the EvalConfig the
options and the target's recipe give, and the call that loads and evaluates it.

The library side of `grass eval` (the command only parses options and prints).
Split in three steps the command calls in order, so cheap mistakes (a folder
that is no model, bad options, no data) fail before minutes of model loading.
Nothing heavy at module level: `grass --help` imports the command that imports this.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grass_cli.errors import GrassError, ModelError

if TYPE_CHECKING:
    from grass_cli.eval_config import EvalConfig
    from grass_cli.recipe import ModelConfig, Recipe


@dataclass
class Target:
    """What `grass eval TARGET` names: the model to load and the recipe it came with."""

    model: ModelConfig
    recipe: Recipe | None
    out_dir: Path  # default output folder, next to the model
    label: str


def resolve_target(target: str) -> Target:
    """A run dir (RUN_DIR/final + its recipe), a model folder, a .gguf, an embedded
    model or a hub id. A model folder inside a run dir (RUN_DIR/final, a checkpoint)
    also picks up the run's recipe, so its rows are formatted as in training."""
    from grass_cli.recipe import ModelConfig

    p = Path(target).expanduser()
    if p.is_dir():
        if (p / "config.json").exists():
            return _model_folder(p)
        if (p / "recipe.yaml").is_file():
            return _run_dir(p, target)
        raise ModelError(
            "this folder is neither a run dir (recipe.yaml + final/) nor a model folder "
            "(config.json)",
            where=target,
            hint="pass a run dir, a model folder, a .gguf file, a hub id or "
            "embedded:smollm2-135m-instruct",
        )
    name = target.rstrip("/").split("/")[-1].split(":")[-1]
    name = name.removesuffix(".gguf") or "model"
    out = p.parent / f"eval-{name}" if p.suffix == ".gguf" else Path(f"eval-{name}")
    return Target(ModelConfig(path=target), None, out, target)


def _model_folder(p: Path) -> Target:
    """A model folder, with the recipe beside it or in its parent (a run's final/)."""
    from grass_cli.recipe import ModelConfig, load_recipe

    recipe_file = next(
        (r for r in (p / "recipe.yaml", p.parent / "recipe.yaml") if r.is_file()), None
    )
    recipe = load_recipe(recipe_file) if recipe_file else None
    model = (recipe.model if recipe else ModelConfig()).model_copy(
        update={"path": str(p), "gradient_checkpointing": False}
    )
    return Target(model, recipe, p.parent / f"eval-{p.name}", str(p))


def _run_dir(p: Path, target: str) -> Target:
    """A run dir: its final model, evaluated with its recipe, results in RUN_DIR/eval."""
    from grass_cli.recipe import load_recipe

    final = p / "final"
    if not (final / "config.json").exists():
        raise ModelError(
            "the run dir has no final model (final/config.json)",
            where=target,
            hint="the run may not have finished; pass a checkpoint folder instead",
        )
    recipe = load_recipe(p / "recipe.yaml")
    model = recipe.model.model_copy(update={"path": str(final), "gradient_checkpointing": False})
    return Target(model, recipe, p / "eval", str(p))


def build_config(recipe: Recipe | None, options: dict[str, Any]) -> EvalConfig:
    """The recipe's `eval:` section (when it has one) with the options given on top;
    an option that is None was not given and leaves the recipe's value."""
    from pydantic import ValidationError

    from grass_cli.eval_config import EvalConfig

    base = getattr(recipe, "eval", None) if recipe is not None else None
    values: dict[str, Any] = base.model_dump(exclude_unset=True) if base is not None else {}
    if options.get("data") is not None:  # other data: the recipe's split and config were its
        values.pop("split", None)
        values.pop("config", None)
    values.update({k: v for k, v in options.items() if v is not None})
    try:
        return EvalConfig.model_validate(values)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'options'}: "
            + err["msg"].removeprefix("Value error, ")
            for err in e.errors()
        )
        raise GrassError(
            f"invalid eval options: {problems}", hint="see grass eval --help"
        ) from None


def evaluate_target(
    target: Target,
    cfg: EvalConfig,
    device: str = "auto",
    out: Path | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Load the target's model on `device` and evaluate it (`run_eval`'s result dict).

    The data file is read first (one row), so a wrong path or a missing data.eval
    fails in a second, not after the model has loaded. Results go to `out`, by
    default the target's folder (RUN_DIR/eval, or eval-NAME next to the model).
    """
    from grass_cli.evaluate.source import check_source, require_source

    data_cfg = target.recipe.data if target.recipe is not None else None
    check_source(require_source(cfg, data_cfg, "--data"))

    from grass_cli.evaluate import pick_device, run_eval
    from grass_cli.models import load_model_and_tokenizer

    dev = pick_device(device)
    model, tokenizer, _ = load_model_and_tokenizer(target.model)
    model.to(dev)
    return run_eval(
        model,
        tokenizer,
        cfg,
        data_cfg,
        dev,
        out if out is not None else target.out_dir,
        autocast=target.recipe.training.autocast if target.recipe is not None else "none",
        model_name=target.label,
        progress=progress,
    )


def evaluate_harness(
    target: Target,
    tasks: list[str],
    include: Path | None = None,
    device: str = "auto",
    out: Path | None = None,
    *,
    limit: int | None = None,
    num_fewshot: int | None = None,
    batch_size: int | None = None,
    chat_template: bool = False,
) -> dict[str, Any]:
    """`grass eval TARGET --harness TASKS`: the target's model scored by
    lm-evaluation-harness (grass_cli.evaluate.harness); the task names are checked
    before the model loads."""
    from grass_cli.evaluate.harness import check_tasks, run_harness

    manager = check_tasks(tasks, include)

    from grass_cli.evaluate import pick_device
    from grass_cli.models import load_model_and_tokenizer

    dev = pick_device(device)
    model, tokenizer, _ = load_model_and_tokenizer(target.model)
    model.to(dev).eval()
    return run_harness(
        model,
        tokenizer,
        tasks,
        manager,
        out if out is not None else target.out_dir,
        limit=limit,
        num_fewshot=num_fewshot,
        batch_size=batch_size or 8,
        chat_template=chat_template,
        model_name=target.label,
    )
