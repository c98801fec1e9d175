"""Command groups beyond `train` and `validate`, one module each.

Each module defines `register(app: typer.Typer) -> None` and must import nothing
heavy (torch, transformers) at module level: `grass --help` imports them all.
Modules are found by name, so adding a command never edits a shared file.
"""

from __future__ import annotations

import importlib
import pkgutil

import typer


def register_all(app: typer.Typer) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(app)
