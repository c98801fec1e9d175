"""Command groups beyond `train` and `validate`, one module each.

Each module defines `register(app: typer.Typer) -> None` and must import nothing
heavy (torch, transformers) at module level: `grass --help` imports them all.
Modules are found by name, so adding a command never edits a shared file. The
modules in `SHARED` hold what several commands use (option types, parsing) and
register nothing; a command module without `register` is a bug and fails loudly.
"""

from __future__ import annotations

import importlib
import pkgutil

import typer

SHARED = frozenset({"options"})


def register_all(app: typer.Typer) -> None:
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name in SHARED:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(app)
