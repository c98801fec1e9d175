"""Chat templates: which Jinja template a dataset's conversations are rendered with.

`data.chat_template` is `auto` / `always` / `never`, the name of one of the
tokenizer's templates (a tokenizer can carry several, e.g. `default` and
`tool_use`: `tokenizer.chat_template` is then a dict), or a Jinja file. The choice
is resolved once, here, to the template's text, and that text is what
`apply_chat_template` renders: transformers renders it in its sandboxed Jinja
environment, so a template is data, never code we import or run ourselves.

Nothing here needs torch, so the file check can run before a model loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from grass_cli.errors import DataError

# The values of data.chat_template that are modes, not a template name or file.
MODES = ("auto", "always", "never")
# Formats whose rows are conversations, which only a chat template can render.
CHAT_FORMATS = ("chat", "sharegpt")
# The name a tokenizer's only template answers to (transformers' name for the default).
DEFAULT_NAME = "default"
# A template file bigger than this is surely not a template (a mistyped path).
MAX_TEMPLATE_BYTES = 1 << 20


def is_template_file(value: str) -> bool:
    """Whether data.chat_template names a file: a path, or a `.jinja` / `.j2` name.

    Template names are bare identifiers (`tool_use`, `rag`), so a separator or a
    Jinja suffix tells a file apart without looking at the disk.
    """
    return value.endswith((".jinja", ".j2")) or "/" in value or os.sep in value


def tokenizer_templates(tokenizer: Any) -> dict[str, str]:
    """The tokenizer's chat templates by name; a single template is `default`."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return {str(k): v for k, v in template.items() if isinstance(v, str) and v}
    if isinstance(template, str) and template:
        return {DEFAULT_NAME: template}
    return {}


def template_file(value: str) -> Path:
    """The path data.chat_template names (`~` expanded), checked to be a readable file."""
    path = Path(value).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise DataError(
            f"the chat template file {path} {what}",
            where="data.chat_template",
            hint="give a Jinja file, the name of one of the tokenizer's templates, "
            "or auto / always / never",
        )
    if path.stat().st_size > MAX_TEMPLATE_BYTES:
        raise DataError(
            f"the chat template file {path} is over {MAX_TEMPLATE_BYTES >> 20} MiB, "
            "too big to be a Jinja template",
            where="data.chat_template",
            hint="check the path",
        )
    return path


def _read_template(value: str) -> str:
    path = template_file(value)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(
            f"cannot read the chat template file {path}: {e}",
            where="data.chat_template",
            hint="the file must be UTF-8 Jinja text",
        ) from None
    if not text.strip():
        raise DataError(f"the chat template file {path} is empty", where="data.chat_template")
    return text


def _named(tokenizer: Any, name: str) -> str:
    """The tokenizer's template called `name`, or an error listing the names it has."""
    templates = tokenizer_templates(tokenizer)
    if name in templates:
        return templates[name]
    if not templates:
        raise DataError(
            f"data.chat_template names the template {name!r}, but the tokenizer has "
            "no chat template",
            where="data.chat_template",
            hint="give a Jinja file instead (a path ending in .jinja), or never",
        )
    raise DataError(
        f"the tokenizer has no chat template named {name!r}; "
        f"it has: {', '.join(sorted(templates))}",
        where="data.chat_template",
        hint="use one of those names, auto (the default template), or a Jinja file",
    )


def _default(tokenizer: Any) -> str | None:
    """The tokenizer's default template; None when it has none."""
    templates = tokenizer_templates(tokenizer)
    if not templates or DEFAULT_NAME in templates:
        return templates.get(DEFAULT_NAME)
    raise DataError(
        "the tokenizer has several chat templates and none is the default; "
        f"it has: {', '.join(sorted(templates))}",
        where="data.chat_template",
        hint="choose one by name, e.g. data.chat_template: " + sorted(templates)[0],
    )


def _no_template_error(fmt: str, choice: str, has: bool) -> DataError:
    """A conversation format (or `always`) without a template to render it."""
    if fmt in CHAT_FORMATS:
        why = "chat_template is never" if has else "the tokenizer has no chat template"
        return DataError(
            f"the {fmt} format needs a chat template, but {why}",
            where="data.chat_template",
            hint="use chat_template: auto with a model that has a chat template "
            "(or a Jinja file), or convert the data to prompt-completion",
        )
    return DataError(
        f"data.chat_template is {choice}, but the tokenizer has no chat template",
        where="data.chat_template",
        hint="use chat_template: auto or never (plain prompt + answer + eos)",
    )


def resolve_template(fmt: str, choice: str, tokenizer: Any) -> str | None:
    """The chat template's text rows of format `fmt` are rendered with; None: plain text.

    `auto` uses the tokenizer's default template when it has one; `always` and the
    conversation formats require a template; `never` renders plain text. The text
    format has no roles, so anything but auto / never is refused for it.
    """
    if fmt == "text":
        if choice not in ("auto", "never"):
            raise DataError(
                "the text format has no roles, so it cannot use a chat template",
                where="data.chat_template",
                hint="use chat_template: auto or never, or the prompt-completion format",
            )
        return None
    if choice == "never":
        if fmt in CHAT_FORMATS:
            raise _no_template_error(fmt, choice, bool(tokenizer_templates(tokenizer)))
        return None
    if choice in ("auto", "always"):
        text = _default(tokenizer)
        if text is None and (choice == "always" or fmt in CHAT_FORMATS):
            raise _no_template_error(fmt, choice, False)
        return text
    return _read_template(choice) if is_template_file(choice) else _named(tokenizer, choice)


def template_label(choice: str) -> str:
    """How error messages name the template in use."""
    if choice in MODES:
        return "the model's chat template"
    if is_template_file(choice):
        return f"the chat template {choice}"
    return f"the chat template {choice!r}"
