"""`run_eval`: the one entry point for `grass eval` and the recipe's `eval:` section.

It plans what to measure on the file, runs each measurement (loss, generation,
multiple choice) with the model in eval mode, and returns one flat dict (a
telemetry event's payload); given a folder, it also writes predictions.jsonl and
result.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from grass_cli.atomic import write_atomic_json, write_atomic_text
from grass_cli.errors import DataError
from grass_cli.eval_config import EvalConfig
from grass_cli.evaluate.choice import choice_metrics
from grass_cli.evaluate.common import EvalContext, Progress
from grass_cli.evaluate.generation import generate_metrics
from grass_cli.evaluate.loss import loss_metrics
from grass_cli.evaluate.plan import EvalPlan, eval_data_config, plan_eval
from grass_cli.evaluate.prompts import PromptRenderer
from grass_cli.evaluate.source import KEY, describe, read_rows, require_source
from grass_cli.recipe import DataConfig


def _write_outputs(out_dir: Path, result: dict[str, Any], items: list[dict[str, Any]]) -> None:
    """predictions.jsonl, then result.json, each written atomically: a result.json
    always sits beside the complete predictions it summarises."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)
    write_atomic_text(out_dir / "predictions.jsonl", lines)
    write_atomic_json(out_dir / "result.json", result)


def _prompt_tokens(
    renderer: PromptRenderer, texts: list[str], max_length: int, path: str
) -> list[list[int]]:
    """Prompt token ids, each cut to its last `max_length` tokens, none empty."""
    # Keep the end of an over-long prompt: that is where the question and the
    # generation prompt are.
    prompts = [p[-max_length:] for p in renderer.ids(texts)]
    empty = [i + 1 for i, p in enumerate(prompts) if not p]
    if empty:
        raise DataError(
            f"the prompt of row {empty[0]} renders to no tokens, so there is "
            "nothing to generate from",
            where=f"{path}:row {empty[0]}",
            hint="give every row a non-empty prompt",
        )
    return prompts


def _answer_metrics(ctx: EvalContext, rows: list[dict[str, Any]], plan: EvalPlan) -> dict[str, Any]:
    """Generation and multiple choice, from prompts rendered as training renders them."""
    renderer = PromptRenderer(plan.data_cfg, ctx.tokenizer)
    rendered = [renderer.text(r, f"{plan.path}:row {i + 1}") for i, r in enumerate(rows)]
    texts = [t for t, _, _ in rendered]
    prompts = _prompt_tokens(renderer, texts, plan.data_cfg.max_length, plan.path)
    for item, (_, user, _) in zip(ctx.items, rendered, strict=True):
        item["prompt"] = user
    out: dict[str, Any] = {}
    if "generate" in plan.kinds:
        golds = [
            r.get(plan.answer_col) if plan.answer_col in r else ref
            for r, (_, _, ref) in zip(rows, rendered, strict=True)
        ]
        out.update(generate_metrics(ctx, prompts, golds, renderer.template))
    if "choice" in plan.kinds:
        out.update(choice_metrics(ctx, rows, prompts, plan))
    return out


@torch.no_grad()
def run_eval(
    model: torch.nn.Module,
    tokenizer: Any,
    cfg: EvalConfig,
    data_cfg: DataConfig | None,
    device: torch.device,
    out_dir: Path | None = None,
    *,
    autocast: str = "none",
    step: int | None = None,
    model_name: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate `model` (already on `device`) on `cfg.data` (or `data_cfg.eval`).

    `data_cfg` is the recipe's data section (None for a bare model: the defaults of
    `DataConfig`); rows are formatted and masked exactly as training does. Returns
    a flat, JSON-able dict: `rows`, `kinds`, and per kind `loss`/`ppl`/`loss_tokens`,
    `accuracy`/`correct`/`scored`, `choice_accuracy`/`choice_correct`; `step` and
    `model` when given. With `out_dir`, writes predictions.jsonl (one line per
    row) and result.json (the returned dict). The model's train/eval mode is
    restored on return; `progress(phase, done, total)` is called as work is done.
    """
    t0 = time.perf_counter()
    src = require_source(cfg, data_cfg, "--data" if data_cfg is None else KEY)
    path = describe(src)
    dc = eval_data_config(data_cfg, cfg, src.path)
    rows = read_rows(src, cfg.limit)
    plan = plan_eval(rows, cfg, dc, path)
    ctx = EvalContext(
        model, tokenizer, cfg, device, autocast, [{"index": i} for i in range(len(rows))], progress
    )
    result: dict[str, Any] = {"data": path, "rows": len(rows), "kinds": plan.kinds}
    if model_name is not None:
        result["model"] = model_name
    if step is not None:
        result["step"] = step
    was_training = model.training
    model.eval()
    try:
        if "loss" in plan.kinds:
            result.update(loss_metrics(ctx, rows, dc))
        if "generate" in plan.kinds or "choice" in plan.kinds:
            result.update(_answer_metrics(ctx, rows, plan))
    finally:
        model.train(was_training)
    result["elapsed_s"] = round(time.perf_counter() - t0, 3)
    if out_dir is not None:
        result["predictions"] = str(Path(out_dir) / "predictions.jsonl")
        _write_outputs(Path(out_dir), result, ctx.items)
    return result
