"""Mixing tokenized sources and holding rows out for evaluation, seeded and deterministic.

Both work on whole tokenized sources (`TokenizedData`), after the token cache, so
a rerun draws exactly the same rows in the same order and a resume's saved batch
position (`BatchIterator`, which shuffles this order per epoch) points at the same
rows. Every draw comes from a NumPy generator seeded with `(seed, stream, source
index)`: held-out rows and mixture samples are independent of each other and of
the batch order, and changing one source's weight leaves the held-out rows alone.

Within each source, the rows kept stay in their file order; sources follow one
another in the recipe's order. A single source with no `rows` and nothing held
out comes back as it is: the data of a recipe from before mixtures, unchanged.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from grass_cli.data.tokens import IGNORE_INDEX, TokenizedData
from grass_cli.errors import DataError
from grass_cli.recipe.sources import DataSource

_EVAL_STREAM = 0x45564C  # the held-out rows
_MIX_STREAM = 0x4D4958  # the rows a mixture takes from each source


def _rng(seed: int, stream: int, index: int) -> np.random.Generator:
    # SeedSequence needs non-negative entries; fold a negative seed into 64 bits.
    return np.random.default_rng([seed % 2**64, stream, index])


def shares(total: int, weights: list[float]) -> list[int]:
    """`total` split in proportion to `weights`, summing exactly to `total` (largest
    remainders get the leftover units; ties go to the earlier source)."""
    w = sum(weights)
    exact = [total * x / w for x in weights]
    counts = [int(e) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def subset(data: TokenizedData, indices: list[int], source: str | None = None) -> TokenizedData:
    """The rows at `indices` (repeats allowed), with tokens and targets recounted."""
    ids = [data.input_ids[i] for i in indices]
    labels = [data.labels[i] for i in indices]
    return replace(
        data,
        input_ids=ids,
        labels=labels,
        source=data.source if source is None else source,
        rows=len(ids),
        tokens=sum(len(r) for r in ids),
        trainable_tokens=sum(1 for lab in labels for x in lab[1:] if x != IGNORE_INDEX),
    )


def concat(parts: list[TokenizedData], source: str) -> TokenizedData:
    """Sources one after another, their counts added up."""
    out = TokenizedData(input_ids=[], labels=[], source=source)
    for p in parts:
        out.input_ids.extend(p.input_ids)
        out.labels.extend(p.labels)
        for k in ("rows", "dropped", "truncated", "tokens", "trainable_tokens"):
            setattr(out, k, getattr(out, k) + getattr(p, k))
    out.from_cache = all(p.from_cache for p in parts)
    return out


def held_out_count(held: float | int, total: int) -> int:
    """Rows held out for `data.eval: held` (a share or a count) of `total` training rows."""
    n = max(1, round(held * total)) if isinstance(held, float) else int(held)
    if n >= total:
        raise DataError(
            f"data.eval holds out {n} rows, but the training data has {total}: nothing "
            "would be left to train on",
            where="data.eval",
            hint="hold out fewer rows (a smaller share or count), or give an eval file",
        )
    return n


def carve(
    parts: list[TokenizedData], held: float | int, seed: int
) -> tuple[list[TokenizedData], list[TokenizedData]]:
    """Split each source into the rows trained on and the rows held out: disjoint,
    seeded, each source giving its share of the held-out rows by its size."""
    sizes = [len(p) for p in parts]
    n_eval = held_out_count(held, sum(sizes))
    train, evals = [], []
    for i, (part, k) in enumerate(zip(parts, shares(n_eval, sizes), strict=True)):
        perm = _rng(seed, _EVAL_STREAM, i).permutation(len(part))
        out = sorted(int(j) for j in perm[:k])
        keep = sorted(int(j) for j in perm[k:])
        train.append(subset(part, keep))
        ev = subset(part, out, source=f"{part.source} (held out)")
        ev.dropped = ev.truncated = 0
        evals.append(ev)
    return train, evals


def _counts(parts: list[TokenizedData], specs: list[DataSource]) -> list[int]:
    """Rows each source gives the mixture: its `rows`, its weighted share of all the
    sources' rows together, or all of its rows."""
    if all(s.weight is not None for s in specs):
        return shares(sum(len(p) for p in parts), [float(s.weight or 0) for s in specs])
    return [s.rows if s.rows is not None else len(p) for p, s in zip(parts, specs, strict=True)]


def _draw(n: int, k: int, rng: np.random.Generator) -> list[int]:
    """`k` of `n` row indices in file order: all of them (k == n), a sample (k < n),
    or every row k // n times and a sample for the rest (k > n)."""
    if k == n:
        return list(range(n))
    whole, rest = divmod(k, n)
    picked = sorted(int(j) for j in rng.permutation(n)[:rest])
    return [j for _ in range(whole) for j in range(n)] + picked


def mix(parts: list[TokenizedData], specs: list[DataSource], seed: int) -> TokenizedData:
    """The training rows of `parts` (one per source, in recipe order), each source
    sampled to its count; one plain source is returned unchanged."""
    counts = _counts(parts, specs)
    if len(parts) == 1 and counts[0] == len(parts[0]):
        return parts[0]
    chosen = []
    for i, (part, k, spec) in enumerate(zip(parts, counts, specs, strict=True)):
        if k > 0 and len(part) == 0:
            raise DataError(
                "this source has no rows left to draw from (all of them are held out by data.eval)",
                where=f"data.train: {spec.path}",
                hint="hold out fewer rows, or give the source more rows",
            )
        chosen.append(subset(part, _draw(len(part), k, _rng(seed, _MIX_STREAM, i))) if k else None)
    kept = [c for c in chosen if c is not None]
    name = " + ".join(p.source for p in parts) if len(parts) > 1 else parts[0].source
    out = concat(kept, name)
    out.dropped = sum(p.dropped for p in parts)
    out.truncated = sum(p.truncated for p in parts)
    return out
