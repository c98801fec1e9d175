"""Data: load rows, render them into tokens and loss labels, batch them.

The pipeline is load -> validate -> render -> tokenize -> truncate -> batch:

* Rows are read through `datasets` (jsonl, json, csv, tsv, parquet) into plain dicts
  in memory, with a throw-away cache so nothing is left in the user's HF cache.
* Each row is rendered into *segments*: pieces of text (or token ids) with a flag
  saying whether the model is trained on them. Segments are tokenized separately
  (no special tokens added) and concatenated, so the loss mask lines up with the
  tokens exactly; no offset mapping or string search is involved. Tokenizing the
  answer separately from its prompt is also what happens at inference, where the
  prompt is encoded and the model then emits the answer token by token.
* Labels equal the input ids except for masked positions (-100). Padding is added
  by position in `collate`, never by comparing ids, because an end-of-turn token
  may share its id with the pad token and must still be trained: it is how the
  model learns to stop.

User mistakes raise `DataError` naming the file, the row (1-based) or column and a
fix. Nothing here prints.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from grass_cli.errors import DataError
from grass_cli.recipe import DataConfig

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100

# File suffix -> `datasets` builder.
LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}

# Canonical fields of each format, in the order they are rendered.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages",),
    "prompt-completion": ("prompt", "completion"),
    "text": ("text",),
}
# Fields that may be absent from the file (or null / empty in a row).
OPTIONAL_FIELDS = frozenset({"input"})
ROLES = ("system", "user", "assistant")

# The classic Alpaca prompts (Taori et al., 2023), used when no chat template is used.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)

# How many row numbers an error lists before "...".
_MAX_LISTED_ROWS = 5
# Strings per batched tokenizer call: large enough for the fast tokenizer's
# parallelism, small enough to bound memory.
_TOKENIZE_CHUNK = 2048
# Text files up to this size are checked for being blank before parsing.
_BLANK_CHECK_BYTES = 1 << 16

# A rendered piece of a row: text (or ready token ids) and whether it is trained.
Segment = tuple[str | list[int], bool]


# --------------------------------------------------------------------------- loading


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


def _root_cause(exc: BaseException) -> str:
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


_PARSE_HINTS = {
    "json": "a .jsonl file needs one JSON object per line; a .json file a list of objects",
    "csv": "the first line must hold the column names; quote fields that contain the separator",
    "parquet": "the file must be a valid Parquet file",
}


def _csv_kwargs(path: Path, sep: str) -> dict[str, Any]:
    """Read every CSV column as text, keeping empty cells and words like "NA" as written.

    Left to itself pandas turns "4" into an int and "NA", "null" or "None" into
    nulls, which corrupts text data: a completion "None" is a valid answer.
    """
    from datasets import Features, Value

    try:
        with path.open(newline="", encoding="utf-8") as f:
            header = next(csv.reader(f, delimiter=sep), [])
    except UnicodeDecodeError as e:
        raise DataError(
            f"cannot read this file as UTF-8 text: {e}", where=str(path), hint="save it as UTF-8"
        ) from None
    return {
        "sep": sep,
        "keep_default_na": False,
        "features": Features({name: Value("string") for name in header}) if header else None,
    }


def load_rows(path: str, limit: int | None = None) -> list[dict[str, Any]]:
    """Read a local jsonl / json / csv / tsv / parquet file into a list of row dicts.

    Only the first `limit` rows are returned when it is given. The `datasets` cache is
    a temporary folder removed on return: training data is read once per run, and a
    stale cache entry for an edited file would be worse than re-reading it.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(
            "data file not found", where=path, hint="check the path in data.train / data.eval"
        )
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
        kind != "parquet" and size <= _BLANK_CHECK_BYTES and not p.read_bytes().strip()
    ):
        raise DataError("the data file is empty (no rows)", where=path)

    import datasets

    kwargs: dict[str, Any] = {}
    if kind == "csv":
        kwargs = _csv_kwargs(p, "\t" if suffix == ".tsv" else ",")
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
        except StopIteration:  # the json reader's way of saying "nothing in here"
            raise DataError("the data file has no rows", where=path) from None
        except Exception as e:  # anything the parsers raise is a malformed file
            if "corresponds to no data" in str(e):  # e.g. a .json file holding []
                raise DataError("the data file has no rows", where=path) from None
            raise DataError(
                f"cannot parse this {kind} file: {_root_cause(e)}",
                where=path,
                hint=_PARSE_HINTS[kind],
            ) from None
        if limit is not None and limit < len(ds):
            ds = ds.select(range(limit))
        rows = ds.to_list()
    if not rows:
        raise DataError("the data file has no rows", where=path)
    return rows


# ------------------------------------------------------------------------ validating


def _resolve_columns(
    fmt: str, fields: dict[str, str], available: list[str], path: str
) -> dict[str, str | None]:
    """Canonical field -> column in the file (None: optional and absent)."""
    canonical = FORMAT_FIELDS[fmt]
    for name in fields:
        if name not in canonical:
            raise DataError(
                f"data.fields maps {name!r}, which is not a field of the {fmt} format",
                where="data.fields",
                hint=f"{fmt} fields: " + ", ".join(canonical),
            )
    columns: dict[str, str | None] = {}
    for name in canonical:
        col = fields.get(name, name)
        if col in available:
            columns[name] = col
            continue
        if name in OPTIONAL_FIELDS and name not in fields:
            columns[name] = None
            continue
        mapped = f" (data.fields maps {name} to it)" if name in fields else ""
        example = next((c for c in available if c not in canonical), "your_column")
        raise DataError(
            f"column {col!r} for the {fmt} field {name!r} not found{mapped}; "
            f"the file has columns: {', '.join(available) or '(none)'}",
            where=path,
            hint=f"map your columns with data.fields, e.g. data.fields: {{{name}: {example}}}",
        )
    return columns


def _text_field(
    row: dict[str, Any], name: str, col: str | None, where: str, optional: bool = False
) -> str:
    value = row.get(col) if col is not None else None
    if value is None:
        if optional:
            return ""
        col_note = f" (column {col!r})" if col != name else ""
        raise DataError(
            f"field {name!r}{col_note} is missing or null in this row",
            where=where,
            hint="every row needs a string value for it",
        )
    if not isinstance(value, str):
        raise DataError(
            f"field {name!r} must be a string, got {type(value).__name__} {value!r:.60}",
            where=where,
            hint="quote the value in the data file",
        )
    return value


def _messages(row: dict[str, Any], col: str, where: str) -> list[dict[str, str]]:
    """Validate a `messages` list; keep only role and content (Arrow adds null extras)."""
    value = row.get(col)
    if not isinstance(value, list) or not value:
        got = "null" if value is None else f"{type(value).__name__} {value!r:.60}"
        hint = "each row needs messages: [{role: user, content: ...}, {role: assistant, ...}]"
        if isinstance(value, str):
            hint += "; CSV cannot hold lists, use JSONL or Parquet"
        raise DataError(f"'messages' must be a non-empty list, got {got}", where=where, hint=hint)
    out: list[dict[str, str]] = []
    for j, m in enumerate(value, 1):
        if not isinstance(m, dict):
            raise DataError(
                f"message {j} must be an object with role and content, got {m!r:.60}",
                where=where,
            )
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            hint = "roles are " + ", ".join(ROLES)
            if m.get("from") is not None or m.get("value") is not None:
                hint += "; this looks like ShareGPT (from/value): convert it to role/content"
            raise DataError(f"message {j} has a bad role {role!r}", where=where, hint=hint)
        if not isinstance(content, str):
            raise DataError(
                f"message {j} ({role}) content must be a string, got {content!r:.60}",
                where=where,
            )
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(
            "the conversation has no assistant message, so there is nothing to train on",
            where=where,
            hint="every conversation needs at least one {role: assistant} message",
        )
    return out


# ------------------------------------------------------------------------- rendering


def _special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids the tokenizer puts before text on its own (a BOS for Llama; none for SmolLM2).

    Template-free rendering tokenizes without special tokens, so the BOS a model was
    trained with must be added back explicitly.
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return list(full[:k])
    return []


class _Renderer:
    """Turns one validated row into segments, with or without the chat template."""

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.use_template = _use_template(cfg, tokenizer)
        eos = tokenizer.eos_token_id
        if not self.use_template and eos is None:
            raise DataError(
                "the tokenizer has no end-of-sequence token to end rows with",
                where="data.chat_template",
                hint="use a model whose tokenizer defines eos_token",
            )
        self.eos: list[int] = [] if eos is None else [int(eos)]
        self.prefix = [] if self.use_template else _special_prefix(tokenizer)

    def render(
        self, row: dict[str, Any], columns: dict[str, str | None], where: str
    ) -> list[Segment]:
        fmt, cfg = self.cfg.format, self.cfg
        tp = cfg.train_on_prompt
        if fmt == "chat":
            col = columns["messages"]
            assert col is not None
            messages = _messages(row, col, where)
            if cfg.system_prompt is not None and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": cfg.system_prompt})
            return self._chat(messages, where)
        if fmt == "text":
            text = _text_field(row, "text", columns["text"], where)
            return [(self.prefix, False), (text, True), (self.eos, True)]
        if fmt == "alpaca":
            instruction = _text_field(row, "instruction", columns["instruction"], where)
            extra = _text_field(row, "input", columns["input"], where, optional=True)
            answer = _text_field(row, "output", columns["output"], where)
            user = instruction + ("\n\n" + extra if extra else "")
            if extra:
                prompt = ALPACA_PROMPT.format(instruction=instruction, input=extra)
            else:
                prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
        else:  # prompt-completion
            user = prompt = _text_field(row, "prompt", columns["prompt"], where)
            answer = _text_field(row, "completion", columns["completion"], where)
        if self.use_template:
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            if cfg.system_prompt is not None:
                messages.insert(0, {"role": "system", "content": cfg.system_prompt})
            return self._chat(messages, where)
        # No separator between prompt and answer: the user controls spacing.
        return [(self.prefix, False), (prompt, tp), (answer, True), (self.eos, True)]

    def _apply(self, messages: list[dict[str, str]], generation: bool, where: str) -> str:
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation
            )
        except Exception as e:  # jinja raise_exception(), bad role order, ...
            raise DataError(
                f"the model's chat template rejected this conversation: {_root_cause(e)}",
                where=where,
                hint="check the role order the model expects (e.g. user/assistant alternating)",
            ) from None
        if not isinstance(text, str):
            raise DataError("the chat template did not render to text", where=where)
        return text

    def _chat(self, messages: list[dict[str, str]], where: str) -> list[Segment]:
        """Segments of a conversation: assistant turns trained, everything else masked.

        Each assistant turn's text is what its full render adds to the render of the
        conversation before it with the generation prompt, so it includes the
        end-of-turn token (`<|im_end|>` and newline for ChatML) that teaches the
        model to stop. That needs each render to extend the previous one; templates
        that rewrite earlier turns (e.g. dropping past reasoning) are refused.
        """
        tp = self.cfg.train_on_prompt
        segments: list[Segment] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self._apply(messages[:i], True, where)
            full = self._apply(messages[: i + 1], False, where)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise DataError(
                    f"the model's chat template does not render message {i + 1} as an "
                    "extension of the conversation before it, so the assistant tokens "
                    "cannot be located",
                    where=where,
                    hint="use data.chat_template: never with the prompt-completion format, "
                    "or a model whose template renders turns append-only",
                )
            segments.append((prompt[len(done) :], tp))
            segments.append((full[len(prompt) :], True))
            done = full
        if messages[-1]["role"] != "assistant":  # trailing turns: context only
            full = self._apply(messages, False, where)
            if not full.startswith(done):
                raise DataError(
                    "the model's chat template does not render the last messages as an "
                    "extension of the conversation before them",
                    where=where,
                    hint="end each conversation with an assistant message",
                )
            segments.append((full[len(done) :], tp))
        return segments


def _use_template(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase) -> bool:
    """Decide once per dataset whether rows go through the tokenizer's chat template."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if cfg.format == "text":
        if cfg.chat_template == "always":
            raise DataError(
                "the text format has no roles, so it cannot use a chat template",
                where="data.chat_template",
                hint="use chat_template: auto or never, or the prompt-completion format",
            )
        return False
    if cfg.format == "chat":
        if cfg.chat_template == "never" or not has:
            why = "chat_template is never" if has else "the tokenizer has no chat template"
            raise DataError(
                f"the chat format needs a chat template, but {why}",
                where="data.chat_template",
                hint="use chat_template: auto with a model that has a chat template, "
                "or convert the data to prompt-completion",
            )
        return True
    if cfg.chat_template == "always" and not has:
        raise DataError(
            "data.chat_template is always, but the tokenizer has no chat template",
            where="data.chat_template",
            hint="use chat_template: auto or never (plain prompt + answer + eos)",
        )
    return has and cfg.chat_template != "never"


# ------------------------------------------------------------------------ tokenizing


@dataclass
class TokenizedData:
    """Tokenized rows ready for batching, with the numbers worth reporting.

    `rows` counts the rows kept, `dropped` those skipped by `truncation: drop`,
    `truncated` those cut to `max_length`. `trainable_tokens` counts loss targets:
    labels other than -100 at positions 1 and later, since the first position is
    never predicted (the model shifts labels by one).
    """

    input_ids: list[list[int]]
    labels: list[list[int]]
    source: str = ""
    rows: int = 0
    dropped: int = 0
    truncated: int = 0
    tokens: int = 0
    trainable_tokens: int = 0

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


def tokenize_rows(
    rows: list[dict[str, Any]],
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    source: str,
) -> TokenizedData:
    """Render, tokenize, mask and truncate in-memory rows (as `load_rows` returns them).

    `source` names the file in error messages. Bad rows fail at the first one, with
    its 1-based row number; rows left with nothing to train on are gathered and
    reported together so one run shows all of them.
    """
    if not rows:
        raise DataError("the data file has no rows", where=source)
    columns = _resolve_columns(cfg.format, dict(cfg.fields), list(rows[0].keys()), source)
    renderer = _Renderer(cfg, tokenizer)
    rendered = [
        renderer.render(row, columns, f"{source}:row {i + 1}") for i, row in enumerate(rows)
    ]
    token_segments = _tokenize_segments(tokenizer, rendered)

    data = TokenizedData(input_ids=[], labels=[], source=source)
    untrainable: list[int] = []
    limit = cfg.max_length
    for i, (segs, seg_ids) in enumerate(zip(rendered, token_segments, strict=True)):
        ids: list[int] = []
        labels: list[int] = []
        for (_, trained), piece in zip(segs, seg_ids, strict=True):
            ids.extend(piece)
            labels.extend(piece if trained else [IGNORE_INDEX] * len(piece))
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
            untrainable.append(i + 1)
            continue
        data.input_ids.append(ids)
        data.labels.append(labels)
        data.tokens += len(ids)
        data.trainable_tokens += trainable

    if untrainable:
        n = len(untrainable)
        raise DataError(
            f"{n} row{'s' if n > 1 else ''} ha{'ve' if n > 1 else 's'} no trainable tokens "
            f"left after truncation to data.max_length={limit} "
            f"(rows {_rows_list(untrainable)})",
            where=source,
            hint="raise data.max_length, or use data.truncation: left (keeps the answer) "
            "or drop (skips long rows)",
        )
    data.rows = len(data.input_ids)
    if data.rows == 0:
        raise DataError(
            f"no rows left: all {data.dropped} rows are longer than "
            f"data.max_length={limit} and truncation is drop",
            where=source,
            hint="raise data.max_length or use data.truncation: left",
        )
    return data


def build_dataset(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, split: Literal["train", "eval"]
) -> TokenizedData:
    """Load and tokenize `data.train` or `data.eval` (with `limit` / `eval_limit`)."""
    if split == "eval":
        if cfg.eval is None:
            raise DataError(
                "no evaluation data: data.eval is not set",
                where="data.eval",
                hint="set data.eval to a data file",
            )
        path, limit = cfg.eval, cfg.eval_limit
    elif split == "train":
        path, limit = cfg.train, cfg.limit
    else:
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    rows = load_rows(path, limit)
    return tokenize_rows(rows, cfg, tokenizer, path)


# -------------------------------------------------------------------------- batching


def collate(
    input_ids: list[list[int]], labels: list[list[int]], pad_id: int
) -> dict[str, torch.Tensor]:
    """Right-pad rows to the longest one: input_ids, attention_mask, labels tensors.

    Padding is decided by position (past each row's length), never by comparing ids
    with `pad_id` or eos, so a trained end-of-turn token that shares the pad id keeps
    its label and attention.
    """
    import torch

    if not input_ids:
        raise ValueError("collate needs at least one row")
    if len(input_ids) != len(labels):
        raise ValueError(f"{len(input_ids)} rows of input_ids but {len(labels)} of labels")
    width = max(len(r) for r in input_ids)
    n = len(input_ids)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    labs = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    for i, (row, lab) in enumerate(zip(input_ids, labels, strict=True)):
        if len(row) != len(lab):
            raise ValueError(f"row {i}: {len(row)} input ids but {len(lab)} labels")
        k = len(row)
        if k:
            ids[i, :k] = torch.tensor(row, dtype=torch.long)
            labs[i, :k] = torch.tensor(lab, dtype=torch.long)
            mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labs}


def steps_per_epoch(n_rows: int, micro_batch_size: int, grad_accum_steps: int) -> int:
    """Optimizer steps to see every row once: ceil(rows / (micro * accum)).

    Equals ceil(micro_batches / accum) with micro_batches = ceil(rows / micro), the
    count `BatchIterator` yields per epoch (it keeps the last partial micro batch).
    """
    if n_rows < 0 or micro_batch_size < 1 or grad_accum_steps < 1:
        raise ValueError("need n_rows >= 0, micro_batch_size >= 1, grad_accum_steps >= 1")
    return math.ceil(n_rows / (micro_batch_size * grad_accum_steps))


class BatchIterator:
    """Micro batches forever, epoch after epoch, resumable exactly.

    Epoch `e` visits the rows in a permutation drawn from a generator seeded with
    `(seed, e)`, so any epoch's order can be rebuilt from the seed alone and a resume
    needs only `(epoch, position)`, not a generator's internal state. `position` is
    the index, in the current epoch's order, of the next row to serve.

    The last micro batch of an epoch may be smaller: it is kept, not dropped and not
    topped up from the next epoch, so that every row is seen exactly once per epoch
    and batches never straddle an epoch. (Loss normalization over uneven batches is
    the trainer's concern.) `next_indices` gives the row indices; iterating gives the
    collated tensors.

    Data-parallel (`world` > 1): the *global* micro batch is `micro_batch_size x
    world` consecutive rows of the epoch's order, and rank r takes every world-th of
    them starting at r. Every rank walks the same order, so the ranks' shards are
    disjoint, together they are exactly the rows one process would take with the
    global batch size, and a resume needs nothing per rank. A rank whose share of an
    epoch's short last batch is empty gets one fully masked row (no loss, zero
    gradient), so that it still takes part in the step's collectives.
    """

    def __init__(
        self,
        data: TokenizedData,
        micro_batch_size: int,
        pad_id: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world: int = 1,
    ):
        if len(data) == 0:
            raise ValueError("BatchIterator needs at least one row")
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a world of {world}")
        self.rank, self.world = rank, world
        self.data = data
        self.micro_batch_size = micro_batch_size
        self.pad_id = pad_id
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    @property
    def n_rows(self) -> int:
        return len(self.data)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.n_rows / (self.micro_batch_size * self.world))

    def order(self, epoch: int) -> np.ndarray:
        """Row indices of `epoch` in visiting order (a pure function of seed and epoch)."""
        if not self.shuffle:
            return np.arange(self.n_rows)
        # SeedSequence needs non-negative entries; fold a negative seed into 64 bits.
        rng = np.random.default_rng([self.seed % 2**64, epoch])
        return rng.permutation(self.n_rows)

    def _current_order(self) -> np.ndarray:
        if self._order is None or self._order_epoch != self.epoch:
            self._order = self.order(self.epoch)
            self._order_epoch = self.epoch
        return self._order

    def next_indices(self) -> list[int]:
        """The next micro batch's row indices (this rank's share of the global micro
        batch); moves to the next epoch after its last."""
        order = self._current_order()
        end = min(self.position + self.micro_batch_size * self.world, self.n_rows)
        batch = [int(i) for i in order[self.position : end]][self.rank :: self.world]
        self.position = end
        if self.position >= self.n_rows:
            self.epoch += 1
            self.position = 0
        return batch

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        if not indices:  # an empty data-parallel share: one row that carries no loss
            row = self.data.input_ids[0][:2]
            return collate([row], [[IGNORE_INDEX] * len(row)], self.pad_id)
        return collate(
            [self.data.input_ids[i] for i in indices],
            [self.data.labels[i] for i in indices],
            self.pad_id,
        )

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.batch(self.next_indices())

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "n_rows": self.n_rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume where `state_dict` was taken; the order comes from the saved seed."""
        if int(state["n_rows"]) != self.n_rows:
            raise DataError(
                f"the checkpoint was taken with {state['n_rows']} training rows, "
                f"but the data now has {self.n_rows}",
                where=self.data.source or None,
                hint="resume with the same data file, data.limit and data.max_length",
            )
        position = int(state["position"])
        if not 0 <= position < self.n_rows:
            raise ValueError(f"position {position} is outside 0..{self.n_rows - 1}")
        self.seed = int(state["seed"])
        self.shuffle = bool(state["shuffle"])
        self.epoch = int(state["epoch"])
        self.position = position
        self._order = None


def eval_batches(
    data: TokenizedData, batch_size: int, pad_id: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Collated batches over the rows in file order, once (for evaluation)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(data), batch_size):
        end = start + batch_size
        yield collate(data.input_ids[start:end], data.labels[start:end], pad_id)
