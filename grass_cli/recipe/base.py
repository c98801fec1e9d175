"""The rules every recipe section shares: unknown keys, numbers, and user paths.

pydantic's lax mode takes `true` for an integer (bool is a subclass of int) and
`.inf` / `.nan` for a float, so `training.max_steps: true` would train one step
and `training.epochs: .inf` would crash later. Strict mode would refuse both, but
also the quoted numbers and lists a YAML file or a `key=value` override gives
today; so this base refuses exactly booleans and non-finite floats, for every
field of every section, including fields added later.
"""

from __future__ import annotations

import os
import types
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator

EMBEDDED_SMOLLM2 = "embedded:smollm2-135m-instruct"


def number_kind(annotation: Any) -> str | None:
    """'an integer' / 'a number' when a field takes an int / a float but not a bool."""
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and bool not in args:
        for arg in args:
            kind = number_kind(arg)
            if kind:
                return kind
    return None


def refuse_bool(annotation: Any, value: Any) -> None:
    """Raise when `value` is a boolean where `annotation` expects a number."""
    kind = number_kind(annotation)
    if kind and isinstance(value, bool):
        raise ValueError(f"Input should be {kind}, not a boolean (true/false)")
    # tuple[float, float] and list[int]: the same rule for each item.
    if typing.get_origin(annotation) in (tuple, list) and isinstance(value, (list, tuple)):
        kinds = [number_kind(a) for a in typing.get_args(annotation) if a is not Ellipsis]
        if any(kinds) and any(isinstance(v, bool) for v in value):
            raise ValueError("Input should be numbers only, not a boolean (true/false)")


def expand_home(path: str | None) -> str | None:
    """`~/runs/x` -> `/home/me/runs/x`, as a shell would; anything else unchanged.

    A path key that is not expanded makes a literal `./~` folder. Expanded in the
    recipe, the path is right for every reader and RUN_DIR/recipe.yaml shows it.
    """
    return os.path.expanduser(path) if path and path.startswith("~") else path


class Section(BaseModel):
    """Base of every section: unknown keys, booleans for numbers and inf/nan are errors."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name or "")
        if field is not None:
            refuse_bool(field.annotation, value)
        return value
