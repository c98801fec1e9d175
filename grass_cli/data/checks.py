"""Finding what is wrong in a data file, by line, in words a user can act on.

The parsers behind `datasets` report a bad JSON Lines file as "Trailing data at
position 167", or, when a cut line runs into the next one, as "Column(/completion)
changed from string to object in row 3" (a 0-based row of an internal block).
So when they fail, the file is read again here, line by line with Python's json,
to name the first line at fault and what is wrong with it.

Two checks run before parsing instead, for failures that are not errors: pandas
reads a CSV row with too many fields by taking the first as an index and silently
shifting the others, and pyarrow's JSON reader crashes the process (segmentation
fault) on a `null` row.
"""

from __future__ import annotations

import codecs
import csv
import json
from pathlib import Path
from typing import Any

from grass_cli.errors import DataError

# csv's default limit (128 KiB per field) would refuse long documents pandas reads.
_CSV_FIELD_LIMIT = 2**31 - 1

_JSONL_HINT = "a .jsonl file needs one complete JSON object per line; fix or remove this line"
_JSON_HINT = "a .json file needs a list of objects, e.g. [{...}, {...}]"


def root_cause(exc: BaseException) -> str:
    """The innermost error's first line: `datasets` wraps the useful pyarrow message."""
    seen: set[int] = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            break
        exc = nxt
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first[:300]


def _kind(value: object) -> str:
    """A JSON value's type in words: "a list", "text", "a number", ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true/false"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    return "a list" if isinstance(value, list) else "an object"


def _bad_unicode(value: Any) -> bool:
    """Whether a parsed value holds a lone surrogate (`\\ud800`), which is not text."""
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _not_object(value: Any) -> str | None:
    return (
        None if isinstance(value, dict) else f"expected a JSON object {{...}}, got {_kind(value)}"
    )


def _value_problem(value: Any) -> str | None:
    """What is wrong with one parsed row, or None."""
    if not isinstance(value, dict):
        return _not_object(value)
    if _bad_unicode(value):
        return "a \\u escape is not valid Unicode (a lone surrogate such as \\ud800)"
    return None


class _Kinds:
    """The type each field (and nested field) had where it was first seen, to find the
    first row that changes it: Arrow needs one type per column."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[str, str]] = {}  # field -> (kind, where first seen)

    def conflict(self, value: Any, where: str, prefix: str = "") -> str | None:
        if isinstance(value, dict):
            items = [(f"{prefix}.{k}" if prefix else str(k), v) for k, v in value.items()]
        elif isinstance(value, list):
            items = [(f"{prefix}[]", v) for v in value]
        else:
            return None
        for name, v in items:
            if v is None:  # null fits any type
                continue
            kind = _kind(v)
            expected, first = self.seen.setdefault(name, (kind, where))
            if kind != expected:
                return f"{name!r} is {kind}, expected {expected} as in {first}"
            found = self.conflict(v, where, name)
            if found is not None:
                return found
        return None


def _parse_line(raw: bytes) -> tuple[Any, str | None]:
    """One line of a JSON Lines file: (value, None), or (None, what is wrong with it)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 text (byte 0x{raw[e.start]:02x} at byte {e.start + 1} of the line)"
    try:
        # strict=False: control characters in strings are the parsers' call, not ours.
        value = json.loads(text.rstrip("\r\n"), strict=False)
    except json.JSONDecodeError as e:
        return None, _syntax(e)
    except RecursionError:
        return None, "not valid JSON (nested too deeply)"
    return value, _value_problem(value)


def _syntax(e: json.JSONDecodeError) -> str:
    """Python's JSON error in words, its column 1-based within its line."""
    return f"not valid JSON ({e.msg.removesuffix(' at')} at column {e.colno})"


def _error(problem: str, where: str, hint: str) -> DataError:
    return DataError(f"cannot parse this json file: {problem}", where=where, hint=hint)


def _document_error(data: bytes, path: str, full: bool) -> DataError | None:
    """The problem of a .json file holding one document (a list of objects), if any.

    Not `full`: only syntax and items that are not objects (before parsing, cheap);
    `full`: also text that is not Unicode and the first item that changes a field's
    type (after the parsers failed)."""
    try:
        doc = json.loads(data.decode("utf-8"), strict=False)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        return _error(f"not UTF-8 text (byte 0x{data[e.start]:02x})", f"{path}:{line}", _JSON_HINT)
    except json.JSONDecodeError as e:
        return _error(_syntax(e), f"{path}:{e.lineno}", _JSON_HINT)
    except RecursionError:
        return _error("not valid JSON (nested too deeply)", path, _JSON_HINT)
    if not isinstance(doc, list):
        return _error(f"the file holds {_kind(doc)}, expected a list of objects", path, _JSON_HINT)
    seen = _Kinds()
    for i, row in enumerate(doc, 1):
        problem = _value_problem(row) if full else _not_object(row)
        if problem is None and full:
            problem = seen.conflict(row, f"row {i}")
        if problem is not None:
            return _error(problem, f"{path}:row {i}", _JSON_HINT)
    return None


def find_json_error(p: Path, path: str) -> DataError | None:
    """The first bad line (1-based) of a JSON Lines file, or a .json document's error.

    A line that is not one JSON object is reported first; failing that, the first
    line that changes a field's type (text in one row, a list in another), which
    Arrow cannot hold in one column. None when nothing is found (the caller then
    reports the parser's own message). A .json file is checked as one document when
    it starts with `[`; otherwise as JSON Lines, which `datasets` also accepts.
    """
    if p.suffix.lower() == ".json":
        data = p.read_bytes().removeprefix(codecs.BOM_UTF8)
        if data.lstrip().startswith(b"["):
            return _document_error(data, path, full=True)
    seen, conflict = _Kinds(), None
    with p.open("rb") as f:
        for n, raw in enumerate(f, 1):
            raw = raw.removeprefix(codecs.BOM_UTF8) if n == 1 else raw
            if not raw.strip():
                continue
            value, problem = _parse_line(raw)
            if problem is not None:
                return _error(problem, f"{path}:{n}", _JSONL_HINT)
            if conflict is None:
                found = seen.conflict(value, f"line {n}")
                conflict = None if found is None else _error(found, f"{path}:{n}", _JSONL_HINT)
    return conflict


def check_json(p: Path, path: str) -> None:
    """Refuse, before the JSON reader runs, what would crash it: a row that is `null`.

    pyarrow's JSON reader (26.x) dies with a segmentation fault on a block that starts
    with a `null` line, taking the whole process with it, and `datasets` turns the
    items of a .json list into such lines. So a JSON Lines file is scanned for null
    lines (cheap: no parsing), and a .json list, which `datasets` parses whole
    anyway, is checked item by item.
    """
    if p.suffix.lower() == ".json":
        data = p.read_bytes().removeprefix(codecs.BOM_UTF8)
        if data.lstrip().startswith(b"["):
            found = _document_error(data, path, full=False)
            if found is not None:
                raise found
            return
    with p.open("rb") as f:
        for n, raw in enumerate(f, 1):
            if raw.removeprefix(codecs.BOM_UTF8).strip() == b"null":
                raise _error("expected a JSON object {...}, got null", f"{path}:{n}", _JSONL_HINT)


def check_csv(path: Path, sep: str) -> list[str]:
    """The header of a CSV / TSV file, after checking that it is UTF-8 and that no row
    has more fields than the header names (pandas would shift such a row's values)."""
    limit = csv.field_size_limit(_CSV_FIELD_LIMIT)
    f = path.open(newline="", encoding="utf-8")
    reader = csv.reader(f, delimiter=sep)
    try:
        with f:
            header = next(reader, [])
            for row in reader:
                if len(row) > len(header):
                    raise DataError(
                        f"this row has {len(row)} fields but the header names "
                        f"{len(header)} columns",
                        where=f"{path}:{reader.line_num}",
                        hint="quote fields that contain the separator, or name every "
                        "column in the first line",
                    )
    except UnicodeDecodeError as e:
        raise DataError(
            f"cannot read this file as UTF-8 text: {e}", where=str(path), hint="save it as UTF-8"
        ) from None
    except csv.Error as e:
        raise DataError(
            f"cannot parse this csv file: {e}",
            where=f"{path}:{reader.line_num}",
            hint="the first line must hold the column names; quote fields that contain "
            "the separator",
        ) from None
    finally:
        csv.field_size_limit(limit)
    return header
