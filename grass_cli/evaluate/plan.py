"""Planning an evaluation: what to measure on a file, checked against its columns.

An eval file often has other columns than the training file, so the kinds to run
(loss, generate, choice) are chosen from the columns when not given, and every
kind's fields are checked before the model runs, with the `--field` fix named.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from grass_cli.data import ANSWER_FIELDS, FORMAT_FIELDS, OPTIONAL_FIELDS
from grass_cli.errors import DataError
from grass_cli.eval_config import EVAL_FIELDS, EvalConfig, EvalKind
from grass_cli.recipe import DataConfig

# The canonical fields a prompt is rendered from (no answer side).
PROMPT_FIELDS: dict[str, tuple[str, ...]] = {
    "prompt-completion": ("prompt",),
    "alpaca": ("instruction", "input"),
    "chat": ("messages",),
    "sharegpt": ("conversations", "system"),
    "text": (),
}


@dataclass
class EvalPlan:
    """What one evaluation measures, resolved against the file's columns."""

    path: str
    data_cfg: DataConfig  # formatting as training renders it, with eval's format/fields
    kinds: list[EvalKind]
    answer_col: str
    choices_col: str
    columns: list[str] = field(default_factory=list)


def eval_data_config(data_cfg: DataConfig | None, cfg: EvalConfig, path: str) -> DataConfig:
    """Training's formatting with the eval file's format and field mapping on top.

    The recipe's field mapping carries over only when the format does, since a
    mapping for one format's fields means nothing for another's.
    """
    base = data_cfg if data_cfg is not None else DataConfig(train=path)
    fmt = cfg.format or base.format
    fields = dict(base.fields) if fmt == base.format else {}
    fields.update({k: v for k, v in cfg.fields.items() if k not in EVAL_FIELDS})
    return base.model_copy(
        update={
            "format": fmt,
            "fields": fields,
            "train": path,
            "eval": path,
            "limit": None,
            "eval_limit": None,
        }
    )


def _missing(fields: dict[str, str], names: Iterable[str], columns: list[str]) -> list[str]:
    """The fields among `names` whose column the file lacks (an unmapped optional may)."""
    return [
        n
        for n in names
        if fields.get(n, n) not in columns and not (n in OPTIONAL_FIELDS and n not in fields)
    ]


def _field_error(name: str, col: str, why: str, columns: list[str], path: str) -> DataError:
    return DataError(
        f"column {col!r} for the field {name!r} ({why}) not found; "
        f"the file has columns: {', '.join(columns) or '(none)'}",
        where=path,
        hint=f"map it with --field {name}=COLUMN (eval.fields in a recipe)",
    )


def _check_mapping(cfg: EvalConfig, fmt: str, columns: list[str], path: str) -> None:
    """Every `--field` names a field of the format (or answer / choices) and a column."""
    known = set(FORMAT_FIELDS[fmt]) | set(EVAL_FIELDS)
    for name in cfg.fields:
        if name not in known:
            raise DataError(
                f"--field maps {name!r}, which is neither a field of the {fmt} format "
                "nor answer / choices",
                where="eval.fields",
                hint="fields: " + ", ".join(sorted(known)),
            )
        if cfg.fields[name] not in columns:  # an explicit mapping must point somewhere
            raise _field_error(
                name, cfg.fields[name], "mapped with --field / eval.fields", columns, path
            )


def _auto_kinds(plan: EvalPlan, fmt: str, fields: dict[str, str]) -> list[EvalKind]:
    """The kinds the columns allow: loss with the format's fields, then choice or generate."""
    columns = plan.columns
    has_prompt = fmt != "text" and not _missing(fields, PROMPT_FIELDS[fmt], columns)
    has_answer = plan.answer_col in columns
    kinds: list[EvalKind] = []
    if not _missing(fields, FORMAT_FIELDS[fmt], columns):
        kinds.append("loss")
    if has_prompt and plan.choices_col in columns and has_answer:
        kinds.append("choice")
    elif has_prompt and has_answer:
        kinds.append("generate")
    if not kinds:
        raise DataError(
            f"nothing to evaluate with the {fmt} format: loss needs the fields "
            f"{', '.join(FORMAT_FIELDS[fmt])}; generation needs a prompt and 'answer'; "
            f"multiple choice needs a prompt, 'choices' and 'answer'. "
            f"The file has columns: {', '.join(columns)}",
            where=plan.path,
            hint="map your columns with --field, e.g. --field prompt=question "
            "--field answer=label, or set --format",
        )
    return kinds


def _check_kind(kind: EvalKind, plan: EvalPlan, fmt: str, fields: dict[str, str]) -> None:
    """The fields `kind` needs are columns of the file, or a DataError naming the fix."""
    columns, path = plan.columns, plan.path
    if kind == "loss":
        for name in _missing(fields, FORMAT_FIELDS[fmt], columns):
            raise _field_error(name, fields.get(name, name), f"{fmt} format", columns, path)
        return
    if fmt == "text":
        raise DataError(
            f"--kind {kind} needs a prompt, and the text format has none",
            where=path,
            hint="use the prompt-completion, alpaca or chat format",
        )
    for name in _missing(fields, PROMPT_FIELDS[fmt], columns):
        raise _field_error(name, fields.get(name, name), "the prompt", columns, path)
    has_answer = plan.answer_col in columns
    if kind == "choice":
        if plan.choices_col not in columns:
            raise _field_error("choices", plan.choices_col, "multiple choice", columns, path)
        if not has_answer:
            raise _field_error("answer", plan.answer_col, "the gold choice", columns, path)
    elif kind == "generate" and not has_answer:
        # The reference completion is the gold answer when there is no answer column.
        gold = ANSWER_FIELDS.get(fmt)
        if gold is not None and fields.get(gold, gold) not in columns:
            raise _field_error("answer", plan.answer_col, "the gold answer", columns, path)


def plan_eval(
    rows: list[dict[str, Any]], cfg: EvalConfig, data_cfg: DataConfig, path: str
) -> EvalPlan:
    """Decide the kinds to run (auto when `cfg.kind` is null) and check their fields."""
    columns = list(rows[0].keys())
    fmt, fields = data_cfg.format, dict(data_cfg.fields)
    _check_mapping(cfg, fmt, columns, path)
    answer_col = cfg.fields.get("answer", "answer")
    choices_col = cfg.fields.get("choices", "choices")
    plan = EvalPlan(path, data_cfg, [], answer_col, choices_col, columns)
    plan.kinds = _auto_kinds(plan, fmt, fields) if cfg.kind is None else list(cfg.kind)
    for kind in plan.kinds:
        _check_kind(kind, plan, fmt, fields)
    return plan
