"""Reading data files into rows: jsonl / json / csv / tsv / parquet -> list of dicts.

Rows are read through `datasets` into plain dicts in memory, with a throw-away
cache so nothing is left in the user's HF cache. When a parser fails, the file is
read again by the checks in `grass_cli.data.checks`, which find the line at fault,
because the parsers' own messages ("Trailing data at position 167") neither name a
line nor say what is wrong with it.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from grass_cli.data.checks import check_csv, check_json, find_json_error, root_cause
from grass_cli.errors import DataError

# File suffix -> `datasets` builder.
LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}

# Text files up to this size are checked for being blank before parsing.
_BLANK_CHECK_BYTES = 1 << 16

_PARSE_HINTS = {
    "json": "a .jsonl file needs one JSON object per line; a .json file a list of objects",
    "csv": "the first line must hold the column names; quote fields that contain the separator",
    "parquet": "the file must be a valid Parquet file",
}


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """Silence `datasets` (progress bars, error logs) while loading, then restore it.

    A bad file is reported once, as a DataError; `datasets` would otherwise also log
    its own traceback-like message and draw progress bars over the CLI's output.
    """
    from datasets.utils import logging as ds_logging

    verbosity = ds_logging.get_verbosity()
    bars = ds_logging.is_progress_bar_enabled()
    ds_logging.set_verbosity(logging.CRITICAL + 1)
    ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        ds_logging.set_verbosity(verbosity)
        if bars:
            ds_logging.enable_progress_bar()


def _csv_kwargs(path: Path, sep: str) -> dict[str, Any]:
    """Read every CSV column as text, keeping empty cells and words like "NA" as written.

    Left to itself pandas turns "4" into an int and "NA", "null" or "None" into
    nulls, which corrupts text data: a completion "None" is a valid answer.
    """
    from datasets import Features, Value

    header = check_csv(path, sep)
    return {
        "sep": sep,
        "keep_default_na": False,
        "features": Features({name: Value("string") for name in header}) if header else None,
    }


def _checked_path(path: str) -> tuple[Path, str]:
    """The data file and its `datasets` builder, or a DataError saying what is wrong."""
    p = Path(path).expanduser()
    if not p.exists():
        # Relative paths are read from the working folder, as in torchtune and axolotl,
        # not from the recipe's: a recipe run from elsewhere says where it looked.
        hint = "check the path in data.train / data.eval"
        if not p.is_absolute():
            hint += f"; a relative path is read from the current folder, {Path.cwd()}"
        raise DataError("data file not found", where=path, hint=hint)
    if p.is_dir():
        raise DataError("expected a data file, got a folder", where=path)
    suffix = p.suffix.lower()
    kind = LOADERS.get(suffix)
    if kind is None:
        raise DataError(
            f"unknown data file type {suffix or '(no extension)'!r}",
            where=path,
            hint="use one of " + ", ".join(LOADERS),
        )
    size = p.stat().st_size
    # Blank text files make the parsers fail with confusing messages; say it plainly.
    if size == 0 or (
        kind != "parquet"
        and size <= _BLANK_CHECK_BYTES
        and not p.read_bytes().removeprefix(codecs.BOM_UTF8).strip()
    ):
        raise DataError("the data file is empty (no rows)", where=path)
    return p, kind


def _out_of_memory(exc: BaseException | None) -> bool:
    """Whether a MemoryError is `exc` or what caused it (datasets wraps it)."""
    seen = 0
    while exc is not None and seen < 20:
        if isinstance(exc, MemoryError):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _parse_error(exc: Exception, p: Path, path: str, kind: str) -> DataError:
    """The DataError for a file the parsers rejected: the line at fault when it is found."""
    if "corresponds to no data" in str(exc):  # e.g. a .json file holding []
        return DataError("the data file has no rows", where=path)
    if kind == "json":
        found = find_json_error(p, path)
        if found is not None:
            return found
    return DataError(
        f"cannot parse this {kind} file: {root_cause(exc)}", where=path, hint=_PARSE_HINTS[kind]
    )


def load_rows(path: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Read a local jsonl / json / csv / tsv / parquet file into a list of row dicts.

    Only the first `limit` rows are returned when it is given. The `datasets` cache is
    a temporary folder removed on return: training data is read once per run, and a
    stale cache entry for an edited file would be worse than re-reading it.
    """
    p, kind = _checked_path(path)
    import datasets

    kwargs: dict[str, Any] = {}
    if kind == "json":
        check_json(p, path)
    elif kind == "csv":
        kwargs = _csv_kwargs(p, "\t" if p.suffix.lower() == ".tsv" else ",")
    with _quiet_datasets(), tempfile.TemporaryDirectory(prefix="grass-data-") as cache:
        try:
            ds = datasets.load_dataset(
                kind,
                data_files=str(p),
                split="train",
                cache_dir=cache,
                keep_in_memory=True,
                **kwargs,
            )
            if limit is not None and limit < len(ds):
                ds = ds.select(range(limit))
            # Inside the try: Arrow decodes text only here, so invalid UTF-8 fails here.
            rows = ds.to_list()
        except StopIteration:  # the json reader's way of saying "nothing in here"
            raise DataError("the data file has no rows", where=path) from None
        except Exception as e:  # anything the parsers raise is a malformed file...
            if _out_of_memory(e):  # ...but memory that ran out while reading it
                raise MemoryError(f"reading {path}") from None
            raise _parse_error(e, p, path, kind) from None
    if not rows:
        raise DataError("the data file has no rows", where=path)
    return rows
