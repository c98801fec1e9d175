"""Data: load rows, render them into tokens and loss labels, batch them.

The pipeline is load -> validate -> render -> tokenize -> truncate -> batch, one
module per stage:

* `reading`: a jsonl / json / csv / tsv / parquet file -> a list of row dicts;
  `checks` names the line at fault when a file cannot be parsed.
* `sources`: a recipe's source -> a file, a folder saved by `datasets`, or a hub
  dataset (`hub_data`: the datasets cache, offline mode, one quick request).
* `rows`: the formats' fields and the validation of each row's values.
* `render`: a row -> segments (text and whether it is trained) or its prompt; the
  one renderer training and evaluation share.
* `tokens`: segments -> token ids and labels (-100 where masked), truncation.
* `cache`: tokenized sources kept between runs, keyed by content, tokenizer, format.
* `mixture`: rows held out for evaluation, sources mixed by weight or row count.
* `build`: a recipe's data section -> training and eval data, through all of these.
* `batches`: padding by position, resumable shuffled epochs, evaluation batches.
* `stream`, `stream_sources`: `data.streaming`, rows read and tokenized as training
  takes them, in seeded shuffle blocks, resumable from a small JSON state.

User mistakes raise `DataError` naming the file, the row (1-based) or line, or
column, and a fix. Nothing here prints.
"""

from grass_cli.data.batches import BatchIterator, collate, eval_batches, steps_per_epoch
from grass_cli.data.build import build_dataset, build_splits
from grass_cli.data.reading import LOADERS, load_rows
from grass_cli.data.render import Prompt, RowRenderer, Segment
from grass_cli.data.rows import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    ANSWER_FIELDS,
    FORMAT_FIELDS,
    OPTIONAL_FIELDS,
    ROLES,
    mapped_columns,
    resolve_columns,
)
from grass_cli.data.tokens import IGNORE_INDEX, TokenizedData, tokenize_rows

__all__ = [
    "ALPACA_PROMPT",
    "ALPACA_PROMPT_NO_INPUT",
    "ANSWER_FIELDS",
    "FORMAT_FIELDS",
    "IGNORE_INDEX",
    "LOADERS",
    "OPTIONAL_FIELDS",
    "ROLES",
    "BatchIterator",
    "Prompt",
    "RowRenderer",
    "Segment",
    "TokenizedData",
    "build_dataset",
    "build_splits",
    "collate",
    "eval_batches",
    "load_rows",
    "mapped_columns",
    "resolve_columns",
    "steps_per_epoch",
    "tokenize_rows",
]
