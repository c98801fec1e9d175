"""Every valid dotted recipe key, and the closest one to a mistyped key.

Used for the "did you mean" part of recipe errors, and by the test that checks
docs/recipes.md documents every key. A key another tool uses (`base_model`,
`learning_rate`) is answered from foreign_keys.py first: spelling alone matches it
to the wrong key, or to none.
"""

from __future__ import annotations

import difflib
import typing
from typing import Any

from pydantic import BaseModel

from grass_cli.recipe.foreign_keys import foreign_hint, foreign_key
from grass_cli.recipe.sections import Recipe


def _section_fields(model: type[BaseModel]) -> dict[str, Any]:
    return dict(model.model_fields)


def all_keys(model: type[BaseModel] = Recipe, prefix: str = "") -> list[str]:
    """Every valid dotted key, for "did you mean" hints and the docs."""
    keys: list[str] = []
    for name, field in _section_fields(model).items():
        ann = field.annotation
        # `EvalSection | None`: an optional section still has dotted keys.
        args = [a for a in typing.get_args(ann) if a is not type(None)]
        if len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            ann = args[0]
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(all_keys(ann, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def suggest_key(bad: str) -> str | None:
    """Closest valid dotted key: another tool's name for it, the same leaf in another
    section, then a near spelling."""
    foreign = foreign_key(bad)
    if foreign is not None:
        return foreign.ours
    keys = all_keys()
    leaf = bad.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
    if leaf in by_leaf:  # right name, wrong section: `sampler.lr` -> `optimizer.lr`
        return by_leaf[leaf]
    close = difflib.get_close_matches(bad, keys, n=1, cutoff=0.6)
    if close:
        return close[0]
    close = difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.75)
    return by_leaf[close[0]] if close else None


def did_you_mean(key: str) -> str | None:
    """The hint for an unknown key, or None when nothing is close. Another tool's key
    is named as such (`'base_model' is axolotl's key; ours is 'model.path'`)."""
    foreign = foreign_hint(key)
    if foreign is not None:
        return foreign
    s = suggest_key(key)
    return f"did you mean '{s}'?" if s and s != key else None
