"""`grass export TARGET --format gguf`: a trained model as one file for llama.cpp,
Ollama and LM Studio. The library side is grass_cli/export/."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from grass_cli.commands.options import json_option, print_json, target_argument


class Format(str, Enum):
    """`--format`: the file format (GGUF, the one llama.cpp and Ollama load)."""

    gguf = "gguf"


class Quant(str, Enum):
    """`--quant`: the tensor type of the matrices (norms and biases stay f32)."""

    f32 = "f32"
    f16 = "f16"
    bf16 = "bf16"
    q8_0 = "q8_0"
    q5_1 = "q5_1"
    q5_0 = "q5_0"
    q4_1 = "q4_1"
    q4_0 = "q4_0"


TargetArg = Annotated[
    str,
    target_argument(
        "A run dir (its final model), a model folder (a checkpoint), a .gguf file, a hub "
        "id or embedded:smollm2-135m-instruct."
    ),
]
FormatOpt = Annotated[Format, typer.Option("--format", help="The file format.")]
QuantOpt = Annotated[
    Quant,
    typer.Option(
        "--quant",
        help="f16 keeps the model as trained in half precision; q8_0 is half the size "
        "with near-equal outputs; q4_*/q5_* are smaller still and lossier.",
    ),
]
OutOpt = Annotated[
    Path | None,
    typer.Option(
        "--out",
        help="The file to write (never replaced). Default: RUN_DIR/RUN-QUANT.gguf, or "
        "FOLDER-QUANT.gguf beside a model folder.",
    ),
]
JsonOpt = Annotated[bool, json_option("Print what was written as JSON on stdout.")]

EPILOG = (
    "Examples:\n\n"
    "  grass export runs/quickstart --format gguf\n\n"
    "  grass export runs/quickstart/checkpoints/step-0000200 --quant q8_0 --out smol.gguf\n\n"
    "Then: llama-cli -m runs/quickstart/quickstart-f16.gguf, or an Ollama Modelfile "
    "with FROM ./quickstart-f16.gguf; grass chat / grass eval read the file too."
)


def export(
    target: TargetArg,
    fmt: FormatOpt = Format.gguf,
    quant: QuantOpt = Quant.f16,
    out: OutOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Write a trained model as a GGUF file (llama.cpp, Ollama, LM Studio)."""
    from grass_cli.cli import _guard
    from grass_cli.export import export_target

    result = _guard(lambda: export_target(target, quant.value, out))
    if json_out:
        print_json(result.as_dict())
        return
    sys.stdout.write(
        f"wrote {result.path} ({fmt.value}, {result.quant}, {result.architecture}, "
        f"{result.params / 1e6:.0f}M parameters, {result.bytes / 1e6:.1f} MB)\n"
    )
    for note in result.notes:
        sys.stderr.write(f"note: {note}\n")


def register(app: typer.Typer) -> None:
    app.command(epilog=EPILOG)(export)
