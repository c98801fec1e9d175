"""The recipe's `data` section: sources, formatting, packing and streaming.

Its own module because it is the largest section; `sections.py` re-exports it.
Per-source rules (weights, rows, formats) are in `sources.py`; the rules that join
data keys with training keys (streaming needs max_steps) are on `Recipe`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import Field, ValidationInfo, field_validator, model_validator

from grass_cli.recipe.base import Section, expand_home
from grass_cli.recipe.sources import DataSource, SourceMapping, parse_eval, parse_train


class DataConfig(Section):
    """Training and evaluation data, and how rows become tokens and labels."""

    # A data file, a folder saved by `datasets`, a hub dataset id, a source
    # {path, config, split, revision, format, fields, weight, rows}, or a list of
    # sources (a mixture, seeded by training.seed). See recipe/sources.py.
    train: str | SourceMapping | list[str | SourceMapping]
    # A file / folder / hub id / source as for train (`~` expanded; checked before
    # training starts), or a share (0 < x < 1) or count (>= 1) of the training rows,
    # held out (seeded, disjoint from the rows trained on).
    eval: str | SourceMapping | float | int | None = None
    # Keep tokenized data in $GRASS_CACHE/tokens, keyed by the data's content, the
    # tokenizer and every formatting key, so a rerun or a resume skips tokenizing.
    cache: bool = True
    # alpaca: instruction/input/output; chat: messages; sharegpt: conversations of
    # {from, value} (and an optional system column); prompt-completion; text.
    format: Literal["alpaca", "chat", "sharegpt", "prompt-completion", "text"] = "prompt-completion"
    # Canonical field name -> column name in your files, e.g. {prompt: question}.
    fields: dict[str, str] = Field(default_factory=dict)
    # Tokens per row after formatting; longer rows are handled by `truncation`.
    max_length: int = Field(512, ge=8)
    # right: cut the end; left: cut the start (keeps the answer); drop: skip the row.
    truncation: Literal["right", "left", "drop"] = "right"
    # false: loss only on completion / assistant tokens (prompt masked with -100).
    train_on_prompt: bool = False
    # auto: use the tokenizer's chat template when it has one (not for `text`);
    # always: require it; never: plain text. Or the name of one of the tokenizer's
    # templates (e.g. tool_use), or a Jinja file (a path with / or ending in .jinja
    # or .j2). Checked against the tokenizer in grass_cli/data/templates.py.
    chat_template: str = Field("auto", min_length=1)
    # Role names of chat / sharegpt turns -> system, user or assistant, on top of the
    # format's own (sharegpt: human, user -> user; gpt, assistant -> assistant; system).
    roles: dict[Annotated[str, Field(min_length=1)], Literal["system", "user", "assistant"]] = (
        Field(default_factory=dict)
    )
    # Optional system message for chat-rendered rows.
    system_prompt: str | None = None
    # Only the first N rows of each file (handy for smoke runs); null: all rows.
    limit: int | None = Field(None, ge=1)
    eval_limit: int | None = Field(None, ge=1)
    # Pack several training rows into each sequence of up to max_length tokens
    # (positions restart and attention stays within each row; data/packing.py).
    # micro_batch_size then counts packed sequences, not rows.
    packing: bool = False
    # Read the training sources as streams (datasets' `streaming=True`): rows are
    # read and tokenized as training takes them, nothing is read ahead or cached, so
    # a dataset larger than memory or disk starts training at once. Needs
    # training.max_steps. The stream, its blocks and resume: data/stream.py.
    streaming: bool = False
    # Streaming: rows read, shuffled (seeded by training.seed) and trained as one
    # block; a resume re-reads only the block it stopped in.
    shuffle_block: int = Field(10_000, ge=1)

    @field_validator("train", "eval", mode="before")
    @classmethod
    def _sources(cls, v: Any, info: ValidationInfo) -> Any:
        formats = get_args(cls.model_fields["format"].annotation)
        return (parse_train if info.field_name == "train" else parse_eval)(v, formats)

    @model_validator(mode="after")
    def _streamable(self) -> DataConfig:
        """What a stream cannot do, refused before anything is read: its length is
        unknown until it ends, so no share of it and no exact row counts."""
        if not self.streaming:
            return self
        if isinstance(self.eval, float):
            raise ValueError(
                f"data.eval is {self.eval}, a share of the training rows, but a stream's "
                "length is unknown (data.streaming is on): hold out a count of rows "
                "(data.eval: 200), give an eval source, or turn data.streaming off"
            )
        sources = self.train if isinstance(self.train, list) else [self.train]
        for i, src in enumerate(sources):
            if not isinstance(src, DataSource):
                continue
            where = f"data.train source {i + 1}" if isinstance(self.train, list) else "data.train"
            if src.rows is not None:
                raise ValueError(
                    f"{where} asks for rows: {src.rows}, but a streamed source's length is "
                    "unknown (data.streaming is on): give the sources weights (their "
                    "shares of the stream), or turn data.streaming off"
                )
            if src.split is not None and "[" in src.split:
                raise ValueError(
                    f"{where} has split {src.split!r}, but a stream takes a whole split "
                    "(data.streaming is on): name the split alone and cap it with "
                    "data.limit, or turn data.streaming off"
                )
        return self

    @field_validator("eval")
    @classmethod
    def _expand_eval(cls, v: Any) -> Any:
        # Not data.train: resume compares it with the stored recipe verbatim, and
        # the reader expands `~` when it opens the file.
        return expand_home(v) if isinstance(v, str) else v
