"""`grass init`'s recipe as YAML with a comment on every choice: what was chosen,
from what (the planner's figures, the data's columns, the preset's lr guidance),
and what to change for another trade-off.

Values are written with PyYAML's own scalar dumper, so a path or a column name
that needs quoting gets it; the text is loaded back and validated before it is
written anywhere.
"""

from __future__ import annotations

import textwrap
from typing import Any

import yaml

WIDTH = 92  # comment lines wrap here


def scalar(value: Any) -> str:
    """One value as YAML flow text (quoted where YAML needs it)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 16).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def render(recipe: dict[str, Any], why: dict[str, str], header: list[str]) -> str:
    """The recipe's sections in order, each key with its value and, where `why` has
    one for its dotted name, a comment above it."""
    lines = [c for h in header for c in _comment(h, "")]
    for section, keys in recipe.items():
        lines.append("")
        if section in why:
            lines += _comment(why[section], "")
        lines.append(f"{section}:")
        lines += _mapping(keys, section, why, "  ")
    return "\n".join(lines) + "\n"


def _mapping(keys: dict[str, Any], prefix: str, why: dict[str, str], indent: str) -> list[str]:
    out: list[str] = []
    for key, value in keys.items():
        dotted = f"{prefix}.{key}"
        if dotted in why:
            out += _comment(why[dotted], indent)
        if isinstance(value, dict) and value:
            out.append(f"{indent}{key}:")
            out += _mapping(value, dotted, why, indent + "  ")
        else:
            out.append(f"{indent}{key}: {scalar(value)}")
    return out


def _comment(text: str, indent: str) -> list[str]:
    """`# text` wrapped at WIDTH; an empty text is a bare `#`; a line starting with
    spaces (a command) is kept as it is."""
    if not text.strip():
        return [f"{indent}#"]
    if text.startswith("  "):
        return [f"{indent}# {text}"]
    return textwrap.wrap(text, WIDTH, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ")
