"""Row formats and their validation: which fields each format has, and checked values.

A row is validated as it is rendered, so a bad value is reported with its file and
1-based row number (`where`) and a fix, before anything is tokenized.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from grass_cli.errors import DataError

# Canonical fields of each format, in the order they are rendered.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "sharegpt": ("conversations", "system"),
    "text": ("text",),
}
# Fields that may be absent from the file (or null / empty in a row).
OPTIONAL_FIELDS = frozenset({"input", "system"})
ROLES = ("system", "user", "assistant")
# The column holding each conversation format's list of turns.
CONVERSATION_FIELDS = {"chat": "messages", "sharegpt": "conversations"}
# Each conversation format's (role key, text key) in a turn, and its own role names.
TURN_KEYS = {"chat": ("role", "content"), "sharegpt": ("from", "value")}
# ShareGPT's names (as axolotl and LLaMA-Factory read them), and the chat names too:
# many ShareGPT-style files write `from: user` / `from: assistant`.
DEFAULT_ROLES: dict[str, dict[str, str]] = {
    "chat": {r: r for r in ROLES},
    "sharegpt": {
        "human": "user",
        "user": "user",
        "gpt": "assistant",
        "assistant": "assistant",
        "system": "system",
    },
}
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


@dataclass(frozen=True)
class FormatGuess:
    """A data format a file's columns fit: `format` is a data.format value and
    `fields` the data.fields mapping that format needs for these columns ({} when the
    columns carry the format's own names, e.g. a `messages` column for chat)."""

    format: str
    fields: dict[str, str] = field(default_factory=dict)

    def mapping_text(self) -> str:
        """`{prompt: question, completion: answer}`: the fields as YAML flow, for hints."""
        return "{" + ", ".join(f"{k}: {v}" for k, v in self.fields.items()) + "}"

    def fields_text(self) -> str:
        """`data.fields: {prompt: question, completion: answer}`, as a hint writes it."""
        return f"data.fields: {self.mapping_text()}"

    def recipe_text(self) -> str:
        """The recipe keys that read the file this way, as a hint writes them."""
        text = f"data.format: {self.format}"
        return f"{text} and {self.fields_text()}" if self.fields else text


# Column sets in the order they are tried: each format's own names first, then the
# common alternatives that need a data.fields mapping. (alpaca before input/output:
# instruction + input + output is alpaca.)
_GUESSES: tuple[tuple[tuple[str, ...], FormatGuess], ...] = (
    (("messages",), FormatGuess("chat")),
    (("conversations",), FormatGuess("sharegpt")),
    (("instruction", "output"), FormatGuess("alpaca")),
    (("prompt", "completion"), FormatGuess("prompt-completion")),
    (("text",), FormatGuess("text")),
    (
        ("question", "answer"),
        FormatGuess("prompt-completion", {"prompt": "question", "completion": "answer"}),
    ),
    (
        ("input", "output"),
        FormatGuess("prompt-completion", {"prompt": "input", "completion": "output"}),
    ),
    (("prompt", "response"), FormatGuess("prompt-completion", {"completion": "response"})),
)


def detect_format(columns: list[str]) -> FormatGuess | None:
    """The format a file with these columns most likely holds, or None.

    Shared by the missing-column hint (a `messages` file read with the default
    format should be told `data.format: chat`, not to map `prompt`) and by `grass
    init`, which writes the guess's data.format and data.fields into a new recipe.
    """
    have = set(columns)
    for need, guess in _GUESSES:
        if have.issuperset(need):
            return FormatGuess(guess.format, dict(guess.fields))  # the caller's own copy
    return None


def _missing_column_hint(fmt: str, name: str, available: list[str]) -> str:
    """How to read a file that lacks `name`: another format its columns fit as they
    are, this format with a mapping the columns suggest, or a data.fields example."""
    guess = detect_format(available)
    if guess is not None and guess.format != fmt:
        return f"this file looks like the {guess.format} format: set {guess.recipe_text()}"
    if guess is not None and guess.fields:
        return f"map your columns with {guess.fields_text()}"
    example = next((c for c in available if c not in FORMAT_FIELDS[fmt]), "your_column")
    return f"map your columns with data.fields, e.g. data.fields: {{{name}: {example}}}"


def resolve_columns(
    fmt: str, fields: dict[str, str], available: list[str], path: str
) -> dict[str, str | None]:
    """Canonical field -> column in the file (None: optional and absent).

    Every required field must be a column of the file: training needs them all. A
    missing one's hint names the format the columns fit, when they fit another.
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
        raise DataError(
            f"column {col!r} for the {fmt} field {name!r} not found{mapped}; "
            f"the file has columns: {', '.join(available) or '(none)'}",
            where=path,
            hint=_missing_column_hint(fmt, name, available),
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


def role_map(fmt: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """A conversation format's role names -> system / user / assistant, with data.roles
    on top (added, or replacing the format's own meaning of a name)."""
    return {**DEFAULT_ROLES[fmt], **(extra or {})}


def _bad_role(fmt: str, m: dict[str, Any], j: int, roles: dict[str, str], where: str) -> DataError:
    """A turn whose role the role map does not know: name it and how to map it."""
    key = TURN_KEYS[fmt][0]
    role = m.get(key)
    if fmt == "chat":
        hint = "roles are " + ", ".join(roles)
        if m.get("from") is not None or m.get("value") is not None:
            hint += "; this looks like ShareGPT (from/value): use data.format: sharegpt"
        else:
            hint += "; map other names with data.roles, e.g. data.roles: {human: user}"
        return DataError(f"message {j} has a bad role {role!r}", where=where, hint=hint)
    if role is None and m.get("role") is not None:
        return DataError(
            f"message {j} has no 'from' key (it has role/content)",
            where=where,
            hint="ShareGPT turns are {from: human|gpt|system, value: ...}; for "
            "{role, content} turns use data.format: chat",
        )
    example = role if isinstance(role, str) and role else "observation"
    return DataError(
        f"message {j} has an unknown role {role!r} ('{key}')",
        where=where,
        hint=f"known roles: {', '.join(roles)}; map it with data.roles, "
        f"e.g. data.roles: {{{example}: user}} (user, assistant or system)",
    )


def _turn(m: Any, j: int, fmt: str, roles: dict[str, str], where: str) -> dict[str, str]:
    """Turn `j` (1-based) as {role, content}, or a DataError saying what is wrong."""
    role_key, text_key = TURN_KEYS[fmt]
    if not isinstance(m, dict):
        raise DataError(
            f"message {j} must be an object with {role_key} and {text_key}, got {m!r:.60}",
            where=where,
        )
    name = m.get(role_key)
    role = roles.get(name) if isinstance(name, str) else None
    if role is None:
        raise _bad_role(fmt, m, j, roles, where)
    content = m.get(text_key)
    if not isinstance(content, str):
        label = name if role == name else f"{name}, {role}"
        raise DataError(
            f"message {j} ({label}) {text_key} must be a string, got {content!r:.60}",
            where=where,
        )
    return {"role": role, "content": content}


def conversation_field(
    row: dict[str, Any],
    col: str,
    where: str,
    fmt: str = "chat",
    roles: dict[str, str] | None = None,
    need_assistant: bool = True,
) -> list[dict[str, str]]:
    """Validate a conversation (chat `messages` or ShareGPT `conversations`) into
    [{role, content}] with the chat roles; keep only those keys (Arrow adds null extras).

    `roles` maps the file's role names (default: the format's own, `role_map`).
    Training needs an assistant message to learn from (`need_assistant`); a
    conversation to generate from (evaluation) may end before the answer.
    """
    roles = role_map(fmt) if roles is None else roles
    role_key, text_key = TURN_KEYS[fmt]
    value = row.get(col)
    if not isinstance(value, list) or not value:
        got = "null" if value is None else f"{type(value).__name__} {value!r:.60}"
        first, second = ("user", "assistant") if fmt == "chat" else ("human", "gpt")
        hint = (
            f"each row needs {col}: [{{{role_key}: {first}, {text_key}: ...}}, "
            f"{{{role_key}: {second}, ...}}]"
        )
        if isinstance(value, str):
            hint += "; CSV cannot hold lists, use JSONL or Parquet"
        raise DataError(f"{col!r} must be a non-empty list, got {got}", where=where, hint=hint)
    out = [_turn(m, j, fmt, roles, where) for j, m in enumerate(value, 1)]
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        to_assistant = [k for k, v in roles.items() if v == "assistant"]
        raise DataError(
            "the conversation has no assistant message, so there is nothing to train on",
            where=where,
            hint=f"every conversation needs at least one {{{role_key}: "
            f"{'|'.join(to_assistant) or 'assistant'}}} message",
        )
    return out
