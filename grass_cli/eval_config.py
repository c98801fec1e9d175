"""The `eval:` recipe section and `grass eval`'s options, as one pydantic model.

It is a leaf module (pydantic only, no torch, no recipe import) so that
`grass_cli.recipe` can embed it as `eval: EvalConfig | None` and `grass validate`
stays fast. Formatting (chat template, max_length, truncation, system prompt) is
not repeated here: evaluation renders rows exactly as training does, from the
recipe's `data:` section; only the format and field mapping may differ, because
an eval file often has other columns than the training file.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

EvalKind = Literal["loss", "generate", "choice"]
ScorerName = Literal["exact", "numeric", "regex"]
DataFormat = Literal["alpaca", "chat", "sharegpt", "prompt-completion", "text"]

# Fields an eval file may have beyond its format's own: the gold answer for
# generation and multiple choice, and the list of choices.
EVAL_FIELDS = ("answer", "choices")


class EvalConfig(BaseModel):
    """What to evaluate, on which file, and how to score it."""

    model_config = ConfigDict(extra="forbid")

    # A data file (jsonl / json / csv / tsv / parquet), a folder saved by datasets or
    # a hub dataset id; null: the recipe's data.eval when it names one.
    data: str | None = None
    # Folders and hub datasets: the split, slices as in datasets (test, test[:200]);
    # null: train. Hub datasets: the configuration (subset), e.g. main.
    split: str | None = None
    config: str | None = None
    # Row format; null: the recipe's data.format (prompt-completion for a bare model).
    format: DataFormat | None = None
    # Canonical field -> column, e.g. {prompt: question, answer: label}. Besides the
    # format's fields: `answer` (gold answer) and `choices` (multiple choice).
    fields: dict[str, str] = Field(default_factory=dict)
    # What to measure; one name or a list. null (auto): loss when the format's
    # fields are present, generate when an answer column is, choice when a
    # choices column is.
    kind: list[EvalKind] | None = None
    # Greedy generation: new tokens per item at most; the model's end-of-turn
    # token and any stop string end an item earlier.
    max_new_tokens: int = Field(64, ge=1)
    stop: list[str] = Field(default_factory=list)
    # exact: normalised text; numeric: `#### N` or the last number, compared as
    # numbers; regex: the pattern's first group compared with the gold text.
    scorer: ScorerName = "exact"
    regex: str | None = None
    # Multiple choice: sum of the choice's token log-likelihoods (default) or
    # their mean (length-normalised, favours long choices less).
    choice_score: Literal["sum", "mean"] = "sum"
    # Only the first N rows; null: all.
    limit: int | None = Field(None, ge=1)
    # Rows per forward pass (loss, choices) and per generated batch.
    batch_size: int = Field(8, ge=1)
    # In a recipe: run every N optimizer steps (and always at the end); null: only
    # at the end. Ignored by `grass eval`.
    interval: int | None = Field(None, ge=1)

    @field_validator("kind", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        """`kind: generate` and `kind: [loss, generate]` both work."""
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("kind")
    @classmethod
    def _no_duplicates(cls, value: list[EvalKind] | None) -> list[EvalKind] | None:
        if value is not None:
            if not value:
                raise ValueError("kind is an empty list; give loss, generate or choice")
            value = list(dict.fromkeys(value))
        return value

    @model_validator(mode="after")
    def _regex_needs_pattern(self) -> EvalConfig:
        if self.scorer == "regex" and not self.regex:
            raise ValueError("scorer is regex but no regex pattern is set (eval.regex)")
        if self.regex:
            import re

            try:
                re.compile(self.regex)
            except re.error as e:
                raise ValueError(f"regex {self.regex!r} does not compile: {e}") from None
        return self
