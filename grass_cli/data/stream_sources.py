"""One streamed source (`data.streaming: true`): its rows through datasets' streaming readers.

A file is read by datasets' own streaming readers (json, csv, parquet), a folder
saved by `save_to_disk` through `Dataset.to_iterable_dataset` (memory-mapped, so
nothing is loaded), and a hub dataset with `load_dataset(..., streaming=True)`,
which fetches rows over the network as they are taken. Every kind becomes a
datasets `IterableDataset`, whose `state_dict` (plain JSON: shard, offset) lets a
resume continue mid-file without reading what came before.

A source runs in passes: when its rows run out it starts again (the next pass), so
a mixture never stops because one source ended. `data.limit` caps every pass
(`take`); rows held out for evaluation (`data.eval: 200`) are the first rows of the
source, skipped by every pass.
"""

from __future__ import annotations

import atexit
import json
import weakref
from collections.abc import Callable
from typing import Any

from grass_cli.data.checks import root_cause
from grass_cli.data.reading import _checked_path, _csv_kwargs, _parse_error, _quiet_datasets
from grass_cli.data.sources import Source, _load_saved, select_split
from grass_cli.errors import DataError

STREAM_HINT = (
    "data.streaming reads the hub while training runs; turn it off to train from the "
    "datasets cache, or save the dataset with `Dataset.save_to_disk(DIR)` and set path to DIR"
)


def _file_factory(source: Source) -> tuple[Callable[[], Any], Callable[[Exception], DataError]]:
    p, kind = _checked_path(source.name)  # a missing / empty / unknown file: the usual errors
    if source.spec.split not in (None, "train"):
        raise DataError(
            f"a file's rows are its split 'train', not {source.spec.split!r}",
            where=f"{source.key}: {source.name}",
            hint="remove split, or cap the rows with data.limit",
        )
    kwargs: dict[str, Any] = {}
    if kind == "csv":
        kwargs = _csv_kwargs(p, "\t" if p.suffix.lower() == ".tsv" else ",")

    def make() -> Any:
        import datasets

        return datasets.load_dataset(
            kind, data_files=str(p), split="train", streaming=True, **kwargs
        )

    return make, lambda e: _parse_error(e, p, source.name, kind)


def _folder_factory(source: Source) -> Callable[[], Any]:
    # (the recipe refuses slices when streaming: this is one whole split)
    where = f"{source.key}: {source.name}"
    return select_split(_load_saved(source), source.spec.split, where).to_iterable_dataset


def _hub_factory(source: Source) -> Callable[[], Any]:
    from grass_cli.data.hub_data import _kwargs, hub_status, offline

    where = f"{source.key}: {source.name}"
    if offline():
        raise DataError(
            "cannot stream this hub dataset: offline mode is set (HF_DATASETS_OFFLINE / "
            "HF_HUB_OFFLINE)",
            where=where,
            hint=STREAM_HINT,
        )
    why = hub_status(source.spec, where)  # one quick request; a DataError when the hub says no
    if why is not None:
        raise DataError(f"cannot stream this hub dataset: {why}", where=where, hint=STREAM_HINT)

    def make() -> Any:
        import datasets

        return datasets.load_dataset(source.spec.path, streaming=True, **_kwargs(source.spec))

    return make


class SourceStream:
    """A source's rows, one at a time, pass after pass, with a resumable position.

    `state()` is JSON: the pass, the rows read in it, and datasets' own state of the
    reader, so `start(state)` continues with the next row without re-reading.
    """

    def __init__(self, source: Source, limit: int | None, skip: int = 0):
        self.source = source
        self.where = f"{source.key}: {source.name}"
        self.limit, self.skip = limit, skip
        self._on_error: Callable[[Exception], DataError] = lambda e: DataError(
            f"cannot read the next row: {root_cause(e)}", where=self.where
        )
        with _quiet_datasets():
            if source.kind == "file":
                self._make, self._on_error = _file_factory(source)
            elif source.kind == "folder":
                self._make = _folder_factory(source)
            else:
                self._make = _hub_factory(source)
        self.passes = 0
        self.index = 0  # rows read in this pass
        self._ds: Any = None
        self._it: Any = None
        # datasets' state_dict() reads as the start until the reader yields a row, even
        # after load_state_dict: the loaded state stands for the position till then
        self._loaded: dict[str, Any] | None = None
        self._closing = False  # close() registered to run at exit

    def _fresh(self) -> Any:
        with _quiet_datasets():
            try:
                ds = self._make()
            except DataError:
                raise
            except Exception as e:
                raise self._on_error(e) from None
        if self.limit is not None:
            ds = ds.take(self.limit)
        return ds.skip(self.skip) if self.skip else ds

    def close(self) -> None:
        """Close the reader. A generator left open until the interpreter shuts down is
        finalized after the modules it uses are gone: datasets' parquet reader then
        prints an "Exception ignored" traceback on the way out."""
        if self._it is not None and hasattr(self._it, "close"):
            self._it.close()
        self._it = None

    def start(self, state: dict[str, Any] | None = None) -> None:
        """Read from the beginning, or from where `state` was taken."""
        self.close()
        if not self._closing:  # (a weak reference: the exit hook keeps nothing alive)
            ref = weakref.ref(self)
            atexit.register(lambda: (stream := ref()) is not None and stream.close())
            self._closing = True
        self._ds = self._fresh()
        self.passes, self.index = 0, 0
        self._loaded = None
        if state is not None:
            self._ds.load_state_dict(state["datasets"])
            self.passes, self.index = int(state["pass"]), int(state["index"])
            self._loaded = json.loads(json.dumps(state["datasets"]))
        self._it = iter(self._ds)

    def state(self) -> dict[str, Any]:
        # a deep, JSON-only copy: datasets keeps updating its own dict as rows are read
        live = self._loaded if self._loaded is not None else self._ds.state_dict()
        ds_state = json.loads(json.dumps(live))
        return {"pass": self.passes, "index": self.index, "datasets": ds_state}

    def _next_raw(self) -> dict[str, Any] | None:
        # (callers read many rows inside one `_quiet_datasets()`: entering it per row
        # costs more than reading the row)
        try:
            row = next(self._it)
        except StopIteration:
            return None
        except Exception as e:  # a malformed line, a network error mid-stream
            raise self._on_error(e) from None
        self._loaded = None
        return row

    def take(self, n: int) -> list[dict[str, Any]]:
        """The next `n` rows of this pass only (for the held-out rows); fewer at its end."""
        out = []
        with _quiet_datasets():
            while len(out) < n and (row := self._next_raw()) is not None:
                out.append(row)
        return out

    def next(self) -> tuple[int, dict[str, Any]]:
        """The next row and its 1-based number in the pass; a new pass when one ends.
        (Call it inside `_quiet_datasets()`, once for many rows.)"""
        row = self._next_raw()
        if row is None:
            if self.index == 0:
                raise DataError(
                    "no rows to train on"
                    + (f" (all {self.skip} are held out by data.eval)" if self.skip else ""),
                    where=self.where,
                    hint="check the split, data.limit and data.eval",
                )
            self.passes += 1
            self.index = 0
            self._loaded = None
            self.close()
            self._ds = self._fresh()
            self._it = iter(self._ds)
            row = self._next_raw()
            if row is None:
                raise DataError("the source has no rows any more", where=self.where)
        self.index += 1
        return self.index + self.skip, row


def first_columns(source: Source) -> list[str] | None:
    """The pre-flight of a streamed source: it opens, and its first row's columns (a
    hub dataset is only confirmed to exist: `grass validate` never downloads)."""
    stream = SourceStream(source, None)
    if source.kind == "hub":
        return None
    stream.start()
    rows = stream.take(1)
    if not rows:
        raise DataError("no rows", where=stream.where, hint="check the file and its split")
    return list(rows[0])
