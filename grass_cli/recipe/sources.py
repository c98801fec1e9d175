"""The data section's sources: one file / folder / hub dataset, a mixture, an eval share.

`data.train` is a path as before (kept verbatim, because a resume compares it with
the stored recipe), a source mapping `{path, config, split, revision, format,
fields, weight, rows}`, or a list of them (a mixture). `data.eval` is a source too,
or a number: a share (0 < x < 1) or a count (>= 1) of the training rows held out.

A mapping is validated here, into one message per source, rather than left to
pydantic's union: for a mapping that fails, the union reports every branch (a
string? a list?) and buries the one line that matters. No `datasets` import here
(`grass validate` stays fast): a split such as `train[:95%]` is checked against
the grammar datasets' ReadInstruction accepts.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any

from pydantic import (
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
)

from grass_cli.recipe.base import Section

# datasets' split grammar (arrow_reader._SUB_SPEC_RE): name[from:to] with optional
# percents and rounding, several joined by `+`.
_SPLIT_PART = re.compile(
    r"^\w+(\.\w+)*(\[((-?[\d_]+)%?)?:((-?[\d_]+)%?)?\])?(\((closest|pct1_dropremainder)\))?$"
)
_SPLIT_JOIN = re.compile(r"\s*\+\s*")


class DataSource(Section):
    """One place rows come from, with its own format and its share of a mixture."""

    # A data file (.jsonl .json .csv .tsv .parquet), a folder saved by datasets'
    # `save_to_disk`, or a hub dataset id (org/name). `~` is expanded when opened.
    path: str = Field(min_length=1)
    # Hub datasets only: the configuration (subset) and the branch, tag or commit.
    config: str | None = Field(None, min_length=1)
    revision: str | None = Field(None, min_length=1)
    # Which split: null is `train`; slices as in datasets: `train[:95%]`, `test[10:200]`.
    split: str | None = None
    # This source's format and columns; null: data.format / data.fields.
    format: str | None = None
    fields: dict[str, str] | None = None
    # Mixtures: the source's share of the rows (relative to the other weights), or
    # an exact row count (a seeded sample; repeated when it asks for more rows).
    weight: float | None = Field(None, gt=0)
    rows: int | None = Field(None, ge=1)

    @field_validator("split")
    @classmethod
    def _split(cls, v: str | None) -> str | None:
        if v is not None and not all(_SPLIT_PART.match(p) for p in _SPLIT_JOIN.split(v.strip())):
            raise ValueError(
                "must be a split name, optionally sliced as in datasets: train, "
                "train[:95%], train[95%:], test[10:200], train[:10%]+test[:10%]"
            )
        return v.strip() if v is not None else v

    @model_serializer(mode="wrap")
    def _given_keys(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # RUN_DIR/recipe.yaml shows a source as written, not with eight nulls.
        return {k: v for k, v in handler(self).items() if v is not None}


# A source mapping as a member of data.train's and data.eval's unions. Annotated, so
# that code walking the sections' fields for nested sections (dotted keys) sees a
# value there, as it is: a source's keys are not recipe keys of their own.
SourceMapping = Annotated[DataSource, "a source mapping"]


def _describe(e: ValidationError, where: str) -> str:
    """A source's pydantic errors as one line: `where: key: what; key: what`."""
    keys = list(DataSource.model_fields)
    parts = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            close = difflib.get_close_matches(loc, keys, n=1, cutoff=0.6)
            near = f" (did you mean '{close[0]}'?)" if close else ""
            parts.append(f"{loc}: unknown key{near}; a source takes {', '.join(keys)}")
        elif err["type"] == "missing":
            parts.append(f"{loc}: required key is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{loc}: {msg} (got {err.get('input')!r})")
    return f"{where}" + "; ".join(parts)


def _source(value: Any, where: str) -> Any:
    """A mapping validated into a DataSource (one message if it is wrong); a string as is.
    `where` prefixes the message (`source 2: ` in a mixture)."""
    if isinstance(value, dict):
        try:
            return DataSource.model_validate(value)
        except ValidationError as e:
            raise ValueError(_describe(e, where)) from None
    if isinstance(value, (str, DataSource)):
        return value
    raise ValueError(
        f"{where}expected a file, folder or hub dataset id, or a source {{path: ..., split: ...}}"
    )


def parse_train(value: Any, formats: tuple[str, ...]) -> Any:
    """data.train before pydantic sees it: a path, a source, or a mixture (a list);
    `formats`: the values data.format takes."""
    if isinstance(value, list):
        if not value:
            raise ValueError("an empty list has no data: give at least one source")
        return check_train([_source(v, f"source {i + 1}: ") for i, v in enumerate(value)], formats)
    return check_train(_source(value, ""), formats)


def parse_eval(value: Any, formats: tuple[str, ...]) -> Any:
    """data.eval before pydantic sees it: a source, or a share / count of train."""
    if value is None or isinstance(value, bool):
        return value  # (a boolean is refused by the number rule)
    if isinstance(value, (int, float)):
        if isinstance(value, float) and value.is_integer() and value >= 1:
            raise ValueError("a count of rows must be a whole number (write 100, not 100.0)")
        if isinstance(value, float) and not 0 < value < 1:
            raise ValueError("a share of the training rows must be between 0 and 1 (e.g. 0.05)")
        if isinstance(value, int) and value < 1:
            raise ValueError("a count of rows held out must be at least 1")
        return value
    if isinstance(value, list):
        raise ValueError("data.eval takes one source (a mixture is for data.train)")
    return check_eval(_source(value, ""), formats)


def _check_source(s: Any, where: str, formats: tuple[str, ...]) -> None:
    if not isinstance(s, DataSource):
        return
    if s.format is not None and s.format not in formats:
        raise ValueError(f"{where}format must be one of {', '.join(formats)}; got {s.format!r}")
    if s.weight is not None and s.rows is not None:
        raise ValueError(f"{where}give weight or rows, not both")


def check_train(train: Any, formats: tuple[str, ...]) -> Any:
    """data.train's rules across keys: formats exist, weights and rows make sense."""
    if not isinstance(train, list):
        _check_source(train, "", formats)
        if isinstance(train, DataSource) and train.weight is not None:
            raise ValueError(
                "weight shares a mixture out between sources, so it needs a list of "
                "sources (use rows for a number of rows)"
            )
        return train
    for i, s in enumerate(train):
        _check_source(s, f"source {i + 1}: ", formats)
    weights = [isinstance(s, DataSource) and s.weight is not None for s in train]
    if any(weights) and not all(weights):
        raise ValueError(
            "every source of a weighted mixture needs a weight (the weights are shares "
            "of the whole mixture), or use rows instead of weights"
        )
    return train


def check_eval(eval_: Any, formats: tuple[str, ...]) -> Any:
    """data.eval's rules across keys (a source's format exists; no weight or rows)."""
    _check_source(eval_, "", formats)
    if isinstance(eval_, DataSource) and (eval_.weight is not None or eval_.rows is not None):
        raise ValueError(
            "weight and rows are for the sources of data.train; use data.eval_limit "
            "to evaluate on fewer rows"
        )
    return eval_
