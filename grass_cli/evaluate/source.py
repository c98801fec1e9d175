"""Which rows task evaluation reads: `eval.data` (a file, a folder saved by datasets
or a hub dataset, with `eval.split` / `eval.config`), else the recipe's `data.eval`
when it names a source rather than rows held out of training.

The rows come through the same sources as training data (data/sources.py): the
datasets cache and offline mode for a hub dataset, `save_to_disk` folders, split
slices; nothing here downloads before `read_rows` is called.
"""

from __future__ import annotations

from typing import Any

from grass_cli.errors import DataError
from grass_cli.eval_config import EvalConfig
from grass_cli.recipe import DataConfig
from grass_cli.recipe.sources import DataSource

KEY = "eval.data"


def task_source(cfg: EvalConfig, data_cfg: DataConfig | None) -> DataSource | None:
    """The source to evaluate on, or None when neither eval.data nor a data.eval
    source is set."""
    if cfg.data is not None:
        return DataSource(path=cfg.data, config=cfg.config, split=cfg.split)
    ev = data_cfg.eval if data_cfg is not None else None
    if isinstance(ev, str):
        return DataSource(path=ev)
    if isinstance(ev, DataSource):
        return DataSource(path=ev.path, config=ev.config, split=ev.split, revision=ev.revision)
    return None


def require_source(cfg: EvalConfig, data_cfg: DataConfig | None, key: str = KEY) -> DataSource:
    """`task_source`, or the error that says what to set (`key`: eval.data in a recipe,
    --data on the command line)."""
    src = task_source(cfg, data_cfg)
    if src is None:
        held = data_cfg is not None and data_cfg.eval is not None
        raise DataError(
            "no data to evaluate on"
            + (
                " (data.eval holds rows out of training; the task eval reads a source)"
                if held
                else ""
            ),
            where=key,
            hint="set eval.data (or data.eval) to a data file, a saved datasets folder or a "
            "hub dataset id; on the command line, --data",
        )
    return src


def describe(src: DataSource) -> str:
    """The source in one string: `path`, `path (config)`, `path [split]`."""
    text = src.path
    if src.config is not None:
        text += f" ({src.config})"
    if src.split is not None:
        text += f" [{src.split}]"
    return text


def check_source(src: DataSource) -> int | None:
    """Before the model loads: the source exists and parses; its rows (None: a hub
    dataset not in the cache, confirmed to exist without downloading)."""
    from grass_cli.data.sources import resolve, survey

    try:
        n, _ = survey(resolve(src, KEY))
    except DataError as e:  # a file's own errors name the file: say which key it is
        if e.where != src.path:
            raise
        hint = (e.hint or "").replace("data.train / data.eval", "eval.data (grass eval: --data)")
        raise DataError(e.what, where=f"{KEY}: {src.path}", hint=hint or None) from None
    return n


def read_rows(src: DataSource, limit: int | None) -> list[dict[str, Any]]:
    """The source's rows (the first `limit`), read as training reads a source."""
    from grass_cli.data.sources import open_source, resolve

    return open_source(resolve(src, KEY), limit).read()
