"""Tokenizing rendered rows: token ids, loss labels, truncation, and the numbers to report.

Labels equal the input ids except for masked positions (-100). Rows left with
nothing to train on are gathered and reported together, so one run shows all of
them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from grass_cli.data.render import RowRenderer, Segment
from grass_cli.data.rows import resolve_columns
from grass_cli.errors import DataError
from grass_cli.recipe import DataConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

# How many row numbers an error lists before "...".
_MAX_LISTED_ROWS = 5
# Strings per batched tokenizer call: large enough for the fast tokenizer's
# parallelism, small enough to bound memory.
_TOKENIZE_CHUNK = 2048


@dataclass
class TokenizedData:
    """Tokenized rows ready for batching, with the numbers worth reporting.

    `rows` counts the rows kept, `dropped` those skipped by `truncation: drop`,
    `truncated` those cut to `max_length`. `trainable_tokens` counts loss targets:
    labels other than -100 at positions 1 and later, since the first position is
    never predicted (the model shifts labels by one). `from_cache`: read from the
    token cache (data/cache.py) instead of tokenized.
    """

    input_ids: list[list[int]]
    labels: list[list[int]]
    source: str = ""
    rows: int = 0
    dropped: int = 0
    truncated: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


def _tokenize_segments(
    tokenizer: PreTrainedTokenizerBase, rendered: list[list[Segment]]
) -> list[list[list[int]]]:
    """Token ids of every text segment, in batched tokenizer calls (much faster)."""
    texts = [seg for segs in rendered for seg, _ in segs if isinstance(seg, str) and seg]
    ids: list[list[int]] = []
    for start in range(0, len(texts), _TOKENIZE_CHUNK):
        chunk = texts[start : start + _TOKENIZE_CHUNK]
        ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
    it = iter(ids)
    out: list[list[list[int]]] = []
    for segs in rendered:
        row: list[list[int]] = []
        for seg, _ in segs:
            if isinstance(seg, str):
                row.append(list(next(it)) if seg else [])
            else:
                row.append(list(seg))
        out.append(row)
    return out


def _rows_list(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:_MAX_LISTED_ROWS])
    return shown + (", ..." if len(numbers) > _MAX_LISTED_ROWS else "")


def _untrainable_error(untrainable: list[int], limit: int, source: str) -> DataError:
    n = len(untrainable)
    return DataError(
        f"{n} row{'s' if n > 1 else ''} ha{'ve' if n > 1 else 's'} no trainable tokens "
        f"left after truncation to data.max_length={limit} "
        f"(rows {_rows_list(untrainable)})",
        where=source,
        hint="raise data.max_length, or use data.truncation: left (keeps the answer) "
        "or drop (skips long rows)",
    )


def _join(segs: list[Segment], pieces: list[list[int]]) -> tuple[list[int], list[int]]:
    """A row's token ids and labels: untrained segments' labels are masked."""
    ids: list[int] = []
    labels: list[int] = []
    for (_, trained), piece in zip(segs, pieces, strict=True):
        ids.extend(piece)
        labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))
    return ids, labels


def tokenize_rows(
    rows: list[dict[str, Any]],
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    source: str,
    *,
    first_row: int = 1,
    allow_empty: bool = False,
) -> TokenizedData:
    """Render, tokenize, mask and truncate in-memory rows (as `load_rows` returns them).

    `source` names the file in error messages. Bad rows fail at the first one, with
    its 1-based row number (`first_row` is the number of `rows[0]`: a stream
    tokenizes its rows a block at a time); rows left with nothing to train on are
    gathered and reported together so one run shows all of them. `allow_empty`: a
    part of a stream whose rows were all dropped is no error (the stream goes on).
    """
    if not rows:
        raise DataError("the data file has no rows", where=source)
    columns = resolve_columns(cfg.format, dict(cfg.fields), list(rows[0].keys()), source)
    renderer = RowRenderer(cfg, tokenizer)
    rendered = [
        renderer.render(row, columns, f"{source}:row {i + first_row}") for i, row in enumerate(rows)
    ]
    token_segments = _tokenize_segments(tokenizer, rendered)

    data = TokenizedData(input_ids=[], labels=[], source=source)
    untrainable: list[int] = []
    limit = cfg.max_length
    for i, (segs, seg_ids) in enumerate(zip(rendered, token_segments, strict=True)):
        ids, labels = _join(segs, seg_ids)
        if len(ids) > limit:
            if cfg.truncation == "drop":
                data.dropped += 1
                continue
            data.truncated += 1
            if cfg.truncation == "left":
                ids, labels = ids[-limit:], labels[-limit:]
            else:
                ids, labels = ids[:limit], labels[:limit]
        trainable = sum(1 for lab in labels[1:] if lab != IGNORE_INDEX)
        if trainable == 0:
            untrainable.append(i + first_row)
            continue
        data.input_ids.append(ids)
        data.labels.append(labels)
        data.tokens += len(ids)
        data.trainable_tokens += trainable

    if untrainable:
        raise _untrainable_error(untrainable, limit, source)
    data.rows = len(data.input_ids)
    if data.rows == 0 and not allow_empty:
        raise DataError(
            f"no rows left: all {data.dropped} rows are longer than "
            f"data.max_length={limit} and truncation is drop",
            where=source,
            hint="raise data.max_length or use data.truncation: left",
        )
    return data
