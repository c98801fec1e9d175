"""Where rows come from: a data file, a folder saved by `datasets`, or a hub dataset.

A recipe's source (a path string or a `DataSource`) is resolved here into one of
three kinds, opened cheaply (a hash of the file, or the memory-mapped Arrow table
of a folder or the datasets cache) and read into row dicts only when its tokens
are not in the token cache (`cache.py`). The split (`train`, `train[:95%]`,
`test[10:20]`) is applied by datasets' own ReadInstruction, so a slice means here
what it means in `datasets.load_dataset`. Hub datasets are in `hub_data.py`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grass_cli.data.checks import root_cause
from grass_cli.data.reading import LOADERS, _checked_path, _quiet_datasets, load_rows
from grass_cli.errors import DataError
from grass_cli.recipe.sources import DataSource

if TYPE_CHECKING:
    from datasets import Dataset

# A hub id as huggingface_hub accepts it: `name` or `org/name`, letters, digits, - _ .
_HUB_ID = re.compile(r"^([\w\-.]+/)?[\w\-.]+$")
# Files saved by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`.
_SAVED_MARKERS = ("dataset_dict.json", "state.json")
_HASH_CHUNK = 1 << 22


@dataclass(frozen=True)
class Source:
    """A resolved source: what it is, where it is named in the recipe, and its spec."""

    spec: DataSource
    kind: str  # "file", "folder" or "hub"
    key: str  # the recipe key, for messages: data.train, data.train source 2, data.eval
    name: str  # the path as written: TokenizedData.source and `where` of row errors

    @property
    def local(self) -> Path:
        return Path(self.spec.path).expanduser()


@dataclass
class Opened:
    """A source opened for reading: a fingerprint of its content (the token cache's
    key) and how to read its rows, which costs time only when called."""

    source: Source
    identity: str
    read: Callable[[], list[dict[str, Any]]]


def as_spec(value: str | DataSource) -> DataSource:
    return value if isinstance(value, DataSource) else DataSource(path=value)


def looks_like_hub_id(path: str) -> bool:
    """`org/name` (or `name`) with no file suffix and nothing that says "local path"."""
    if path.startswith(("/", "~", ".")) or Path(path).suffix.lower() in LOADERS:
        return False
    return bool(_HUB_ID.match(path)) and ".." not in path and "--" not in path


def resolve(value: str | DataSource, key: str) -> Source:
    """A source's kind: an existing file or folder, else a hub id, else a missing file
    (whose error load_rows words as before)."""
    spec = as_spec(value)
    p = Path(spec.path).expanduser()
    if p.is_dir():
        kind = "folder"
    elif p.is_file() or not looks_like_hub_id(spec.path):
        kind = "file"
    else:
        kind = "hub"
    if kind != "hub" and (spec.config is not None or spec.revision is not None):
        raise DataError(
            f"config and revision are for hub datasets, and this is a local {kind}",
            where=f"{key}: {spec.path}",
            hint="remove config / revision, or give a hub dataset id (org/name)",
        )
    return Source(spec=spec, kind=kind, key=key, name=spec.path)


def file_digest(paths: list[Path], base: Path | None = None) -> str:
    """sha256 over files' names (relative to `base`) and bytes, in the order given."""
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.relative_to(base) if base else p.name).encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def split_ranges(split: str, sizes: dict[str, int], where: str) -> list[tuple[str, int, int]]:
    """(split name, start, stop) of each part of a split spec such as `train[:95%]`."""
    from datasets import ReadInstruction

    try:
        parts = ReadInstruction.from_spec(split).to_absolute(sizes)
    except (ValueError, KeyError, AssertionError) as e:
        raise DataError(
            f"cannot take split {split!r}: {root_cause(e)}",
            where=where,
            hint=f"splits here: {', '.join(sizes)}; slices as in datasets: train[:95%], "
            "train[95%:], test[10:200]",
        ) from None
    return [(p.splitname, p.from_, p.to) for p in parts]


def _take(rows: list[dict[str, Any]], split: str | None, where: str) -> list[dict[str, Any]]:
    """A file's rows are its split `train`: apply a slice of it."""
    if split is None or split == "train":
        return rows
    out: list[dict[str, Any]] = []
    for _, start, stop in split_ranges(split, {"train": len(rows)}, where):
        out.extend(rows[start:stop])
    return out


def _no_rows(source: Source) -> DataError:
    split = source.spec.split or "train"
    return DataError(
        f"the split {split!r} has no rows",
        where=f"{source.key}: {source.name}",
        hint="check data split slices such as train[95%:] (they may be empty on small data)",
    )


def _open_file(source: Source, limit: int | None) -> Opened:
    p, _ = _checked_path(source.name)  # a missing / empty / unknown file: the usual errors
    split = source.spec.split
    where = f"{source.key}: {source.name}"

    def read() -> list[dict[str, Any]]:
        if split is None or split == "train":
            return load_rows(source.name, limit)  # exactly as before sources existed
        rows = _take(load_rows(source.name), split, where)
        if not rows:
            raise _no_rows(source)
        return rows[:limit] if limit is not None else rows

    identity = f"file:{p.suffix.lower()}:{file_digest([p])}:split={split or 'train'}"
    return Opened(source, identity, read)


def _load_saved(source: Source) -> Any:
    """`datasets.load_from_disk` of a folder saved by save_to_disk (memory-mapped)."""
    p = source.local
    where = f"{source.key}: {source.name}"
    if not any((p / m).is_file() for m in _SAVED_MARKERS):
        raise DataError(
            "a folder, but not one saved by datasets (no dataset_dict.json or state.json)",
            where=where,
            hint="give a data file, a folder written by Dataset.save_to_disk / "
            "DatasetDict.save_to_disk, or a hub dataset id",
        )
    import datasets

    with _quiet_datasets():
        try:
            return datasets.load_from_disk(str(p))
        except Exception as e:  # a damaged folder: say so in one line
            raise DataError(
                f"cannot load this datasets folder: {root_cause(e)}", where=where
            ) from None


def select_split(loaded: Any, split: str | None, where: str) -> Dataset:
    """One Dataset from a Dataset or DatasetDict by split spec (default `train`)."""
    import datasets

    spec = split or "train"
    by_name = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
    chosen = []
    for name, start, stop in split_ranges(spec, {n: len(d) for n, d in by_name.items()}, where):
        whole = by_name[name]
        same = (start, stop) == (0, len(whole))
        chosen.append(whole if same else whole.select(range(start, stop)))
    return chosen[0] if len(chosen) == 1 else datasets.concatenate_datasets(chosen)


def dataset_rows(ds: Any, limit: int | None, source: Source) -> list[dict[str, Any]]:
    """A datasets.Dataset's first `limit` rows as dicts (Arrow decodes text here)."""
    if len(ds) == 0:
        raise _no_rows(source)
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    with _quiet_datasets():
        try:
            return ds.to_list()
        except Exception as e:
            raise DataError(
                f"cannot read the rows: {root_cause(e)}", where=f"{source.key}: {source.name}"
            ) from None


def _open_folder(source: Source, limit: int | None) -> Opened:
    where = f"{source.key}: {source.name}"
    loaded = _load_saved(source)
    ds = select_split(loaded, source.spec.split, where)
    p = source.local
    files = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    identity = f"folder:{file_digest(files, p)}:split={source.spec.split or 'train'}"
    return Opened(source, identity, lambda: dataset_rows(ds, limit, source))


def hub_identity(ds: Any, spec: DataSource) -> str:
    """A hub dataset's content, as far as the datasets cache knows it: its fingerprint
    and Arrow files (named after the data's hash), with the split asked for."""
    files = [os.path.basename(f["filename"]) for f in getattr(ds, "cache_files", [])]
    return (
        f"hub:{spec.path}:{spec.config}:{spec.revision}:split={spec.split or 'train'}:"
        f"{getattr(ds, '_fingerprint', '')}:{len(ds)}:{','.join(files)}"
    )


def open_source(source: Source, limit: int | None) -> Opened:
    """Open a source for reading; `limit` keeps only its first rows."""
    if source.kind == "file":
        return _open_file(source, limit)
    if source.kind == "folder":
        return _open_folder(source, limit)
    from grass_cli.data.hub_data import load_hub

    ds = load_hub(source.spec, f"{source.key}: {source.name}")
    return Opened(source, hub_identity(ds, source.spec), lambda: dataset_rows(ds, limit, source))


def survey(source: Source) -> tuple[int | None, list[str] | None]:
    """Rows and columns of a source, for the pre-flight: every row of a file parsed
    (a bad line is found now, not after the model loads); a folder's or a cached hub
    dataset's Arrow table read for its size and columns. A hub dataset not in the
    local cache is only confirmed to exist (nothing is downloaded): (None, None)."""
    where = f"{source.key}: {source.name}"
    if source.kind == "file":
        rows = _take(load_rows(source.name), source.spec.split, where)
        if not rows:
            raise _no_rows(source)
        return len(rows), list(rows[0].keys())
    if source.kind == "folder":
        ds = select_split(_load_saved(source), source.spec.split, where)
    else:
        from grass_cli.data.hub_data import cached_or_probe

        ds = cached_or_probe(source.spec, where)
        if ds is None:
            return None, None
    if len(ds) == 0:
        raise _no_rows(source)
    return len(ds), list(ds.column_names)
