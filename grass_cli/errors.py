"""The one exception root for mistakes a user can cause.

The CLI maps `GrassError` to a single `Error: ...` line on stderr and exit code 2;
anything else is a bug and keeps its traceback. Messages say what was wrong,
where (file, key, row) and how to fix it, so they are built here in one shape.
"""

from __future__ import annotations


class GrassError(Exception):
    """A user-caused error: bad recipe, missing file, bad data row, ...

    `where` names the place (a file, `file:row`, a dotted key) and `hint` says how
    to fix it; both are optional but should be given whenever they are known.
    """

    # 2: the user can fix the input; subclasses for failures of a run use 1.
    exit_code = 2

    def __init__(self, what: str, *, where: str | None = None, hint: str | None = None):
        self.what = what
        self.where = where
        self.hint = hint
        super().__init__(self.format())

    def format(self) -> str:
        text = f"{self.where}: {self.what}" if self.where else self.what
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class RecipeError(GrassError):
    """The recipe (YAML or overrides) is malformed or does not validate."""


class DataError(GrassError):
    """A data file is missing, unreadable, or has a bad row."""


class ModelError(GrassError):
    """A model cannot be found, loaded or mapped into blocks."""
