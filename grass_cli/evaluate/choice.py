"""Multiple choice: the choice whose tokens the model finds most likely wins.

Each choice is the answer a training row would have after the prompt (the
assistant content with a chat template, the completion without), tokenized on its
own as training tokenizes answers; end-of-turn tokens are not scored.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from grass_cli.data import IGNORE_INDEX, collate
from grass_cli.errors import DataError
from grass_cli.evaluate.common import EvalContext, batched
from grass_cli.evaluate.loss import autocast_ctx, row_loss_sums
from grass_cli.evaluate.plan import EvalPlan

# (prompt ids, continuation ids): one choice appended to its row's prompt.
Sequence = tuple[list[int], list[int]]


def gold_choice(value: Any, choices: list[str], where: str) -> int:
    """Gold index from an index, a letter (A, B, ...) or the choice's text."""
    if isinstance(value, bool):
        value = None
    if isinstance(value, int) and 0 <= value < len(choices):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text in choices:
            return choices.index(text)
        if len(text) == 1 and text.isalpha() and ord(text.upper()) - 65 < len(choices):
            return ord(text.upper()) - 65
        if text.isdigit() and int(text) < len(choices):
            return int(text)
    raise DataError(
        f"answer {value!r} is not a choice index (0-{len(choices) - 1}), a letter "
        f"(A-{chr(64 + len(choices))}) or the text of one of the {len(choices)} choices",
        where=where,
    )


def choice_logprobs(
    model: torch.nn.Module,
    sequences: list[Sequence],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    autocast: str = "none",
) -> list[tuple[float, int]]:
    """(sum of log p(continuation | prompt), continuation tokens) per (prompt, continuation)."""
    out: list[tuple[float, int]] = []
    for start, end in batched(len(sequences), batch_size):
        chunk = sequences[start:end]
        batch = collate(
            [p + c for p, c in chunk],
            [[IGNORE_INDEX] * len(p) + list(c) for p, c in chunk],
            pad_id,
        )
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast_ctx(device, autocast):
            sums, counts = row_loss_sums(model, batch)
        out.extend((-s, c) for s, c in zip(sums.tolist(), counts.tolist(), strict=True))
    return out


def _sequences(
    tokenizer: Any, rows: list[dict[str, Any]], prompts: list[list[int]], plan: EvalPlan
) -> tuple[list[Sequence], list[tuple[int, int]], list[int]]:
    """Every row's (prompt, choice) sequences, each row's span of them, and gold indices.

    A prompt is cut from the left so that prompt and choice fit data.max_length.
    """
    sequences: list[Sequence] = []
    spans: list[tuple[int, int]] = []
    golds: list[int] = []
    limit = plan.data_cfg.max_length
    for i, row in enumerate(rows):
        where = f"{plan.path}:row {i + 1}"
        choices = row.get(plan.choices_col)
        if not isinstance(choices, list) or len(choices) < 2:
            raise DataError(
                f"field 'choices' (column {plan.choices_col!r}) must be a list of at least "
                f"two strings, got {choices!r:.60}",
                where=where,
            )
        choices = [str(c) for c in choices]
        golds.append(gold_choice(row.get(plan.answer_col), choices, where))
        enc = tokenizer(choices, add_special_tokens=False)["input_ids"]
        for j, ids in enumerate(enc):
            if not ids:
                raise DataError(f"choice {j} is empty", where=where)
        start = len(sequences)
        for ids in enc:
            keep = max(1, limit - len(ids))
            sequences.append((prompts[i][-keep:], list(ids)))
        spans.append((start, len(sequences)))
    return sequences, spans, golds


def choice_metrics(
    ctx: EvalContext, rows: list[dict[str, Any]], prompts: list[list[int]], plan: EvalPlan
) -> dict[str, Any]:
    """Multiple-choice accuracy: the most likely choice (sum or mean log-prob) wins."""
    cfg = ctx.cfg
    sequences, spans, golds = _sequences(ctx.tokenizer, rows, prompts, plan)
    scores: list[tuple[float, int]] = []
    for start, end in batched(len(sequences), cfg.batch_size * 4):
        scores.extend(
            choice_logprobs(
                ctx.model,
                sequences[start:end],
                ctx.pad_id,
                cfg.batch_size,
                ctx.device,
                ctx.autocast,
            )
        )
        ctx.report("choice", end, len(sequences))
    correct = 0
    for i, (a, b) in enumerate(spans):
        logps = [s for s, _ in scores[a:b]]
        ranked = logps if cfg.choice_score == "sum" else [s / c for s, c in scores[a:b]]
        pick = max(range(len(ranked)), key=lambda j: ranked[j])
        correct += pick == golds[i]
        ctx.items[i].update(
            choice_logprobs=logps,
            choice_tokens=[c for _, c in scores[a:b]],
            choice=pick,
            gold_choice=golds[i],
            choice_correct=pick == golds[i],
        )
    n = len(rows)
    return {
        "choice_accuracy": correct / n if n else math.nan,
        "choice_correct": correct,
        "choice_score": cfg.choice_score,
    }
