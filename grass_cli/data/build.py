"""Building the training and eval data of a recipe: sources -> tokens (cached) -> held out -> mixed.

Each source is opened (sources.py), its tokens taken from the token cache or
tokenized and stored (cache.py), then rows are held out for `data.eval: 0.05`
and the sources mixed (mixture.py), both seeded with `training.seed`. A recipe
with one file and an eval file goes through the same steps and gets exactly the
rows, order and tokens it got before sources existed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from grass_cli.data import cache
from grass_cli.data.mixture import carve, concat, mix, subset
from grass_cli.data.sources import as_spec, open_source, resolve
from grass_cli.data.tokens import TokenizedData, tokenize_rows
from grass_cli.errors import DataError
from grass_cli.recipe import DataConfig
from grass_cli.recipe.sources import DataSource

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def held_out(cfg: DataConfig) -> float | int | None:
    """`data.eval` as a share or count of the training rows, or None (a source / unset)."""
    ev = cfg.eval
    return ev if isinstance(ev, (int, float)) and not isinstance(ev, bool) else None


def train_specs(cfg: DataConfig) -> list[tuple[str, str | DataSource]]:
    """(recipe key, source) of each training source, in recipe order."""
    if isinstance(cfg.train, list):
        return [(f"data.train source {i + 1}", s) for i, s in enumerate(cfg.train)]
    return [("data.train", cfg.train)]


def source_config(cfg: DataConfig, spec: DataSource) -> DataConfig:
    """The data config a source is tokenized with: its own format and fields, if any."""
    update = {}
    if spec.format is not None:
        update["format"] = spec.format
    if spec.fields is not None:
        update["fields"] = dict(spec.fields)
    return cfg.model_copy(update=update) if update else cfg


def tokenized_source(
    value: str | DataSource,
    key: str,
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    limit: int | None,
) -> TokenizedData:
    """One source's tokens: from the token cache when `cfg.cache` and it has them,
    else read, tokenized and stored (a failed store is only a later miss)."""
    source = resolve(value, key)
    scfg = source_config(cfg, source.spec)
    opened = open_source(source, limit)
    k = cache.data_key(opened.identity, scfg, tokenizer, limit) if cfg.cache else None
    if k is not None:
        hit = cache.load(k, source.name)
        if hit is not None:
            return hit
    data = tokenize_rows(opened.read(), scfg, tokenizer, source.name)
    if k is not None:
        cache.save(k, data)
    return data


def _train_parts(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[TokenizedData], list[DataSource]]:
    named = train_specs(cfg)
    parts = [tokenized_source(v, k, cfg, tokenizer, cfg.limit) for k, v in named]
    return parts, [as_spec(v) for _, v in named]


def build_splits(
    cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int = 0
) -> tuple[TokenizedData, TokenizedData | None]:
    """The training data and the eval data (None without `data.eval`), built once.

    `seed` (training.seed) draws the rows held out by `data.eval: 0.05` and the rows
    a mixture takes from each source.
    """
    parts, specs = _train_parts(cfg, tokenizer)
    held = held_out(cfg)
    eval_data = None
    if held is not None:
        parts, evals = carve(parts, held, seed)
        eval_data = concat(evals, " + ".join(e.source for e in evals))
        if cfg.eval_limit is not None and cfg.eval_limit < len(eval_data):
            eval_data = subset(eval_data, list(range(cfg.eval_limit)))
    elif cfg.eval is not None:
        eval_data = tokenized_source(cfg.eval, "data.eval", cfg, tokenizer, cfg.eval_limit)
    return mix(parts, specs, seed), eval_data


def build_dataset(
    cfg: DataConfig,
    tokenizer: PreTrainedTokenizerBase,
    split: Literal["train", "eval"],
    seed: int = 0,
) -> TokenizedData:
    """`data.train` (mixed, less any held-out rows) or `data.eval` (with `limit` /
    `eval_limit`). `build_splits` builds both at once (held-out rows need the
    training sources either way)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    if split == "eval" and cfg.eval is None:
        raise DataError(
            "no evaluation data: data.eval is not set",
            where="data.eval",
            hint="set data.eval to a data file",
        )
    if held_out(cfg) is None:
        if split == "eval":
            return tokenized_source(cfg.eval, "data.eval", cfg, tokenizer, cfg.eval_limit)
        parts, specs = _train_parts(cfg, tokenizer)
        return mix(parts, specs, seed)
    train, eval_data = build_splits(cfg, tokenizer, seed)
    return eval_data if split == "eval" and eval_data is not None else train
