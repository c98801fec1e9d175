"""Option types and parsing helpers that several commands share, each defined once.

A command's signature names an `Annotated` alias (`device: DeviceOption`), so the
flag, its type, its checks and its help are written in one place. Where the flag
is the same but its help says something command-specific (what `--data` defaults
to differs between `grass eval` and `grass inspect-importance`), a small function
fixes the flag and its checks and the command passes its own help.

Not a command: `register_all` skips this module. Imports nothing heavy, since
`grass --help` imports it.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from grass_cli.errors import GrassError

if TYPE_CHECKING:
    from rich.console import Console


class RowFormat(str, Enum):
    """`--format`: how a data row becomes a prompt and a completion (data.format)."""

    prompt_completion = "prompt-completion"
    alpaca = "alpaca"
    chat = "chat"
    sharegpt = "sharegpt"
    text = "text"


class Device(str, Enum):
    """`--device` of the commands that load a model: auto picks cuda when there is one."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


# ------------------------------------------------------------------ the same everywhere

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="Dotted overrides, key.path=value (value parsed as YAML), "
        "e.g. training.max_steps=200 sampler.gamma=4.",
        show_default=False,
    ),
]
FormatOption = Annotated[
    RowFormat | None,
    typer.Option("--format", help="Row format. Default: the recipe's, else prompt-completion."),
]
DeviceOption = Annotated[Device, typer.Option("--device")]

# --------------------------------------------- the same flag, help given by the command


def target_argument(help: str) -> Any:
    """TARGET: what the command works on; the help lists the kinds it accepts."""
    return typer.Argument(help=help, show_default=False)


def data_option(help: str) -> Any:
    """`--data FILE`: a jsonl/json/csv/tsv/parquet file; the default is the command's."""
    return typer.Option("--data", help=help)


def fields_option(help: str) -> Any:
    """`--field FIELD=COLUMN`, repeatable; read with `parse_fields`."""
    return typer.Option("--field", help=help)


def batch_size_option(help: str) -> Any:
    """`--batch-size N`: rows per batch, at least one."""
    return typer.Option("--batch-size", min=1, help=help)


def out_option(help: str) -> Any:
    """`--out DIR`: the folder the command writes into."""
    return typer.Option("--out", help=help)


def json_option(help: str) -> Any:
    """`--json`: the result as JSON on stdout instead of a table."""
    return typer.Option("--json", help=help)


# ------------------------------------------------------------------------------ parsing


def parse_fields(pairs: list[str] | None) -> dict[str, str]:
    """`--field prompt=question` (repeatable) -> {"prompt": "question"}."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        name, sep, column = pair.partition("=")
        if not sep or not name.strip() or not column.strip():
            raise GrassError(
                f"--field {pair!r} is not of the form FIELD=COLUMN",
                where="--field",
                hint="for example --field prompt=question --field answer=label",
            )
        out[name.strip()] = column.strip()
    return out


def choice_value(choice: Enum | None) -> str | None:
    """The string of an enum option, None when the option was not given: the
    library's configs take plain strings and read None as "use the default"."""
    return None if choice is None else choice.value


# ------------------------------------------------------------------------------ output


def print_json(result: Any, indent: int | None = None) -> None:
    """Data goes to stdout as one JSON document (chatter goes to stderr)."""
    sys.stdout.write(json.dumps(result, indent=indent) + "\n")


def stdout_console(width: int | None = None) -> Console:
    """A Rich console on stdout (imported here, not at module level: `grass --help`)."""
    from rich.console import Console

    return Console(file=sys.stdout, width=width)
