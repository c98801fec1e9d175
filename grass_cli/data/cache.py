"""The token cache: tokenized sources kept between runs, so a rerun or a resume skips tokenizing.

One safetensors file per (data content, tokenizer, formatting) under
`$GRASS_CACHE/tokens/` (default `~/.cache/grass/tokens`): flat int32 `input_ids`
and `labels` with int64 row `offsets`, and the counts `TokenizedData` reports in
the header's metadata. safetensors holds plain arrays, so loading a crafted cache
file cannot run code (no pickle anywhere). Files are written to a temporary
sibling and renamed, so a reader sees a whole file or none, and a file that does
not read back exactly (damaged, another format) is a miss, never an error.

The key hashes everything the tokens depend on: the data's content (file bytes,
a folder's files, a hub dataset's fingerprint and cached Arrow files, with the
split), the tokenizer (its vocabulary and rules, special tokens, chat template),
every data key except the ones that only choose data (`train`, `eval`, `limit`
(hashed as the rows actually read), `eval_limit`, `cache`), the bytes of
grass's data code, and the tokenizer libraries' versions. A new data key is in
the key by default: a forgotten one can cost a miss, never a stale hit.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from grass_cli.atomic import write_atomic_bytes
from grass_cli.data.tokens import TokenizedData
from grass_cli.recipe import DataConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

FORMAT = "1"
# Data keys that choose which data is read, not how it becomes tokens.
NOT_FORMATTING = frozenset({"train", "eval", "limit", "eval_limit", "cache"})
_COUNTS = ("rows", "dropped", "truncated", "tokens", "trainable_tokens")
# tokenizer -> (its length, digest of its backend): the backend's JSON takes ~70 ms
# to serialize, and the test suite builds hundreds of datasets with one tokenizer.
_BACKEND_DIGESTS: weakref.WeakKeyDictionary[Any, tuple[int, str]] = weakref.WeakKeyDictionary()


def cache_root() -> Path:
    from grass_cli.models import cache_dir

    return cache_dir() / "tokens"


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """The bytes of grass's data code: a change to how rows render is a new key."""
    h = hashlib.sha256()
    for p in sorted(Path(__file__).parent.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _backend_digest(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:  # a slow tokenizer: its vocabulary and added tokens
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """What tokenizing and rendering read from a tokenizer, hashed."""
    n = len(tokenizer)
    try:
        known = _BACKEND_DIGESTS.get(tokenizer)
    except TypeError:  # not weak-referenceable: no memo
        known = None
    if known is None or known[0] != n:
        known = (n, _backend_digest(tokenizer))
        with contextlib.suppress(TypeError):
            _BACKEND_DIGESTS[tokenizer] = known
    extra = {
        "class": type(tokenizer).__name__,
        "backend": known[1],
        "len": n,
        "special": tokenizer.special_tokens_map,
        "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "chat_template": getattr(tokenizer, "chat_template", None),
    }
    return hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode()).hexdigest()


def _template_file(value: Any) -> str | None:
    """A chat template given as a file: its bytes are part of the key, not its name."""
    if isinstance(value, str) and value not in ("auto", "always", "never"):
        p = Path(value).expanduser()
        if p.is_file():
            return hashlib.sha256(p.read_bytes()).hexdigest()
    return None


def data_key(
    identity: str, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, limit: int | None
) -> str:
    """The cache key of one source tokenized with `cfg` (format and fields resolved)."""
    import tokenizers
    import transformers

    formatting = {k: v for k, v in cfg.model_dump(mode="json").items() if k not in NOT_FORMATTING}
    parts = {
        "format": FORMAT,
        "data": identity,
        "limit": limit,
        "formatting": formatting,
        "template_file": _template_file(cfg.chat_template),
        "tokenizer": tokenizer_digest(tokenizer),
        "code": code_digest(),
        "versions": [transformers.__version__, tokenizers.__version__],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _path(key: str) -> Path:
    return cache_root() / key[:2] / f"{key}.safetensors"


def load(key: str, source: str) -> TokenizedData | None:
    """The cached tokens of `key`, or None (absent, damaged or another format)."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    path = _path(key)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="np") as f:
            meta = f.metadata() or {}
        arrays = load_file(str(path))
        ids, labels, offsets = arrays["input_ids"], arrays["labels"], arrays["offsets"]
        counts = {k: int(meta[k]) for k in _COUNTS}
        ok = (
            meta.get("format") == FORMAT
            and meta.get("key") == key
            and len(ids) == len(labels) == int(offsets[-1])
            and len(offsets) == counts["rows"] + 1
            and bool(np.all(np.diff(offsets) >= 0))
        )
    except Exception:  # a damaged or foreign file is a miss, never an error
        return None
    if not ok:
        return None
    flat_ids, flat_labels, bounds = ids.tolist(), labels.tolist(), offsets.tolist()
    spans = list(zip(bounds[:-1], bounds[1:], strict=True))
    data = TokenizedData(
        input_ids=[flat_ids[a:b] for a, b in spans],
        labels=[flat_labels[a:b] for a, b in spans],
        source=source,
        **counts,
    )
    data.from_cache = True
    return data


def save(key: str, data: TokenizedData) -> bool:
    """Write `data` under `key` atomically; False when it could not be written (a
    full disk or a read-only cache costs the next run a tokenization, not this run)."""
    from safetensors.numpy import save as to_bytes

    lengths = np.fromiter((len(r) for r in data.input_ids), dtype=np.int64, count=len(data))
    offsets = np.concatenate([np.zeros(1, dtype=np.int64), np.cumsum(lengths)])
    total = int(offsets[-1])
    ids = np.fromiter((t for r in data.input_ids for t in r), dtype=np.int64, count=total)
    labels = np.fromiter((t for r in data.labels for t in r), dtype=np.int64, count=total)
    if total and (ids.max() >= 2**31 or min(ids.min(), labels.min()) < -(2**31)):
        return False  # (no vocabulary is that large; do not store what int32 would wrap)
    meta = {"format": FORMAT, "key": key, **{k: str(getattr(data, k)) for k in _COUNTS}}
    blob = to_bytes(
        {"input_ids": ids.astype(np.int32), "labels": labels.astype(np.int32), "offsets": offsets},
        metadata=meta,
    )
    path = _path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic_bytes(path, blob)
    except OSError:
        return False
    return True
