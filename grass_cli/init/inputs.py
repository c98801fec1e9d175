"""What `grass init` reads before choosing: the model (a preset, a hub id, a folder)
and the data (its rows, columns, format and typical length).

Nothing here loads weights or tokenizes: the model is known from its config (a
preset's shipped shape needs no network) and a row's length in tokens is
estimated from its characters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from grass_cli.errors import DataError
from grass_cli.presets import Preset, find_preset, preset_names

# Rows read to estimate lengths, and characters per token assumed: BPE vocabularies
# of 32k-256k give 3.5-4.5 characters per token on English prose; 3 leaves room for
# code, numbers and chat-template markup.
SAMPLE_ROWS = 2000
CHARS_PER_TOKEN = 3.0
# data.max_length is a multiple of this, at most MAX_LENGTH unless asked for.
LENGTH_STEP = 256
MAX_LENGTH = 4096


@dataclass
class ModelInfo:
    """The model as the recipe names it, its preset (if any), and its size."""

    path: str  # what model.path will say
    preset: Preset | None
    params: int
    blocks: int
    max_positions: int | None
    guide: Preset  # whose lr guidance applies: its own preset, else the nearest in size


@dataclass
class DataInfo:
    """The training data: rows, columns, the detected format, a typical length."""

    path: str
    rows: int
    columns: list[str]
    format: str
    fields: dict[str, str]
    p99_tokens: int  # estimated: 99% of rows are at most this long


def inspect_model(model: str) -> ModelInfo:
    """Read a model's shape from its preset, folder, GGUF or hub config (no weights)."""
    from grass_cli.planner.shape import build_layout, load_config
    from grass_cli.recipe import validate_dict

    preset = find_preset(model)
    path = preset.name if preset is not None and "/" not in model else model
    probe = validate_dict({"model": {"path": path}, "data": {"train": "-"}}, "grass init")
    # a preset's hub id is planned from the preset's shape: no network needed
    config, name = load_config(probe, preset.name if preset is not None else None)
    lay = build_layout(probe, config, name)
    text = getattr(config, "text_config", None) or config
    positions = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    return ModelInfo(
        path=path,
        preset=preset,
        params=lay.params,
        blocks=len(lay.blocks),
        max_positions=int(positions) if positions else None,
        guide=preset or nearest_preset(lay.params),
    )


def nearest_preset(params: int) -> Preset:
    """The shipped preset closest in size (log scale): its lr guidance is the best
    start for a model grass has none for."""
    import math

    from grass_cli.presets import get_preset

    presets = [get_preset(n, "grass init") for n in preset_names()]
    return min(presets, key=lambda p: abs(math.log(p.params_b * 1e9 / max(params, 1))))


def inspect_data(data: str, fmt: str | None, fields: dict[str, str]) -> DataInfo:
    """Rows and columns of a file, saved folder or cached hub dataset; the format from
    the columns unless given; the 99th percentile of row lengths, estimated."""
    from grass_cli.data.rows import detect_format
    from grass_cli.data.sources import open_source, resolve, survey

    source = resolve(data, "DATA")
    n, columns = survey(source)
    if n is None or columns is None:
        raise DataError(
            "this hub dataset is not in the local datasets cache, so its rows cannot be read",
            where=f"DATA: {data}",
            hint="download it once where there is network (datasets.load_dataset), or "
            "give a local file or a folder saved with save_to_disk",
        )
    if fmt is None:
        guess = detect_format(columns)
        if guess is None:
            raise DataError(
                f"cannot tell the data's format from its columns ({', '.join(columns)})",
                where=f"DATA: {data}",
                hint="pass --format (prompt-completion, alpaca, chat, sharegpt, text) and "
                "--field FIELD=COLUMN for the columns it needs",
            )
        fmt, fields = guess.format, {**guess.fields, **fields}
    rows = open_source(source, SAMPLE_ROWS).read()
    lengths = sorted(_chars(r) / CHARS_PER_TOKEN for r in rows)
    p99 = lengths[min(len(lengths) - 1, int(0.99 * len(lengths)))] if lengths else 0
    return DataInfo(data, n, columns, fmt, fields, int(p99) + 1)


def _chars(value: Any) -> int:
    """Characters of text in a row (every string in it, nested lists of turns too),
    plus a little per string for the template's markup around it."""
    if isinstance(value, str):
        return len(value) + 8
    if isinstance(value, dict):
        return sum(_chars(v) for v in value.values())
    if isinstance(value, list):
        return sum(_chars(v) for v in value)
    return 0


def max_length_for(data: DataInfo, model: ModelInfo, given: int | None) -> int:
    """data.max_length: the given one, else the data's 99th percentile rounded up to a
    multiple of LENGTH_STEP, at most MAX_LENGTH and what the model handles."""
    if given is not None:
        return given
    length = -(-data.p99_tokens // LENGTH_STEP) * LENGTH_STEP
    cap = min(MAX_LENGTH, model.max_positions or MAX_LENGTH)
    return max(LENGTH_STEP, min(length, cap))
