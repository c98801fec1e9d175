"""Row formats and their validation: which fields each format has, and checked values.

A row is validated as it is rendered, so a bad value is reported with its file and
1-based row number (`where`) and a fix, before anything is tokenized.
"""

from __future__ import annotations

from typing import Any

from grass_cli.errors import DataError

# Canonical fields of each format, in the order they are rendered.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "text": ("text",),
}
# Fields that may be absent from the file (or null / empty in a row).
OPTIONAL_FIELDS = frozenset({"input"})
ROLES = ("system", "user", "assistant")
# The field holding the answer (what is trained) of each instruction format.
ANSWER_FIELDS = {"alpaca": "output", "prompt-completion": "completion"}

# The classic Alpaca prompts (Taori et al., 2023), used when no chat template is used.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def resolve_columns(
    fmt: str, fields: dict[str, str], available: list[str], path: str
) -> dict[str, str | None]:
    """Canonical field -> column in the file (None: optional and absent).

    Every required field must be a column of the file: training needs them all.
    """
    canonical = FORMAT_FIELDS[fmt]
    for name in fields:
        if name not in canonical:
            raise DataError(
                f"data.fields maps {name!r}, which is not a field of the {fmt} format",
                where="data.fields",
                hint=f"{fmt} fields: " + ", ".join(canonical),
            )
    columns: dict[str, str | None] = {}
    for name in canonical:
        col = fields.get(name, name)
        if col in available:
            columns[name] = col
            continue
        if name in OPTIONAL_FIELDS and name not in fields:
            columns[name] = None
            continue
        mapped = f" (data.fields maps {name} to it)" if name in fields else ""
        example = next((c for c in available if c not in canonical), "your_column")
        raise DataError(
            f"column {col!r} for the {fmt} field {name!r} not found{mapped}; "
            f"the file has columns: {', '.join(available) or '(none)'}",
            where=path,
            hint=f"map your columns with data.fields, e.g. data.fields: {{{name}: {example}}}",
        )
    return columns


def mapped_columns(fmt: str, fields: dict[str, str]) -> dict[str, str | None]:
    """Canonical field -> column by the mapping alone, present in the file or not.

    For evaluation, whose files may lack the answer side that training needs; a
    missing column then reads as a missing value in each row.
    """
    return {name: fields.get(name, name) for name in FORMAT_FIELDS[fmt]}


def text_field(
    row: dict[str, Any], name: str, col: str | None, where: str, optional: bool = False
) -> str:
    """The string value of field `name` (column `col`); "" for an absent optional one."""
    value = row.get(col) if col is not None else None
    if value is None:
        if optional:
            return ""
        col_note = f" (column {col!r})" if col != name else ""
        raise DataError(
            f"field {name!r}{col_note} is missing or null in this row",
            where=where,
            hint="every row needs a string value for it",
        )
    if not isinstance(value, str):
        raise DataError(
            f"field {name!r} must be a string, got {type(value).__name__} {value!r:.60}",
            where=where,
            hint="quote the value in the data file",
        )
    return value


def _message(m: Any, j: int, where: str) -> dict[str, str]:
    """Message `j` (1-based) as {role, content}, or a DataError saying what is wrong."""
    if not isinstance(m, dict):
        raise DataError(
            f"message {j} must be an object with role and content, got {m!r:.60}",
            where=where,
        )
    role, content = m.get("role"), m.get("content")
    if role not in ROLES:
        hint = "roles are " + ", ".join(ROLES)
        if m.get("from") is not None or m.get("value") is not None:
            hint += "; this looks like ShareGPT (from/value): convert it to role/content"
        raise DataError(f"message {j} has a bad role {role!r}", where=where, hint=hint)
    if not isinstance(content, str):
        raise DataError(
            f"message {j} ({role}) content must be a string, got {content!r:.60}",
            where=where,
        )
    return {"role": role, "content": content}


def messages_field(
    row: dict[str, Any], col: str, where: str, need_assistant: bool = True
) -> list[dict[str, str]]:
    """Validate a `messages` list; keep only role and content (Arrow adds null extras).

    Training needs an assistant message to learn from (`need_assistant`); a
    conversation to generate from (evaluation) may end before the answer.
    """
    value = row.get(col)
    if not isinstance(value, list) or not value:
        got = "null" if value is None else f"{type(value).__name__} {value!r:.60}"
        hint = "each row needs messages: [{role: user, content: ...}, {role: assistant, ...}]"
        if isinstance(value, str):
            hint += "; CSV cannot hold lists, use JSONL or Parquet"
        raise DataError(f"'messages' must be a non-empty list, got {got}", where=where, hint=hint)
    out = [_message(m, j, where) for j, m in enumerate(value, 1)]
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise DataError(
            "the conversation has no assistant message, so there is nothing to train on",
            where=where,
            hint="every conversation needs at least one {role: assistant} message",
        )
    return out
