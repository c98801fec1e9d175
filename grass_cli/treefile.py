"""Plain data with tensors in it, saved as JSON + safetensors: nothing we load runs code.

Checkpoints hold nested state (an optimizer's state dict, RNG states, a sampler's
position) that `torch.save` would pickle, and unpickling a file can run any code
its author chose. A tree here is written as two files instead:

- `NAME.json`: the structure, with every tensor replaced by a reference
  `{"__tensor__": key}`; tuples, dicts with non-string keys (an optimizer's
  per-parameter state is keyed by int) and NumPy arrays are tagged so they come
  back as what they were;
- `NAME.safetensors`: the tensors, by key (safetensors is a header + raw bytes).

Reading parses JSON and raw tensor bytes, so a crafted file can at worst be refused
as malformed. Allowed leaves: None, bool, int, float (NaN and infinities included),
str, torch tensors and NumPy arrays.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from grass_cli.errors import GrassError

TENSOR, TUPLE, ITEMS, ARRAY = "__tensor__", "__tuple__", "__items__", "__ndarray__"


class _Encoder:
    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, t: torch.Tensor) -> str:
        key = str(len(self.tensors))
        # safetensors refuses tensors that share memory, and saves contiguous bytes
        self.tensors[key] = t.detach().to("cpu").contiguous().clone()
        return key

    def encode(self, obj: Any) -> Any:
        if obj is None or isinstance(obj, (bool, int, str)):
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {"__float__": repr(obj)}
        if isinstance(obj, torch.Tensor):
            return {TENSOR: self.add(obj)}
        if isinstance(obj, np.ndarray):
            return {
                ARRAY: self.add(torch.from_numpy(obj.astype(obj.dtype, copy=True))),
                "dtype": str(obj.dtype),
            }
        if isinstance(obj, np.generic):
            return self.encode(obj.item())
        if isinstance(obj, tuple):
            return {TUPLE: [self.encode(v) for v in obj]}
        if isinstance(obj, list):
            return [self.encode(v) for v in obj]
        if isinstance(obj, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in obj):
                return {k: self.encode(v) for k, v in obj.items()}
            return {ITEMS: [[self.encode(k), self.encode(v)] for k, v in obj.items()]}
        raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint")


def _file(path: Path, ext: str) -> Path:
    return path.with_name(path.name + ext)  # (not with_suffix: "block.0" has a dot)


def save_tree(path: Path, obj: Any) -> list[Path]:
    """Write `obj` as PATH.json (+ PATH.safetensors when it holds tensors); returns
    the files written. The caller makes the whole checkpoint atomic."""
    enc = _Encoder()
    skeleton = enc.encode(obj)
    files = [_file(path, ".json")]
    if enc.tensors:
        files.append(_file(path, ".safetensors"))
        save_file(enc.tensors, str(files[1]))
    with open(files[0], "w", encoding="utf-8") as f:
        json.dump(skeleton, f)
    return files


def _decode(obj: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors, where) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if TENSOR in obj:
        return _tensor(tensors, obj[TENSOR], where)
    if ARRAY in obj:
        return _tensor(tensors, obj[ARRAY], where).numpy().astype(np.dtype(obj["dtype"]))
    if "__float__" in obj:
        return float(obj["__float__"])
    if TUPLE in obj:
        return tuple(_decode(v, tensors, where) for v in obj[TUPLE])
    if ITEMS in obj:
        return {_decode(k, tensors, where): _decode(v, tensors, where) for k, v in obj[ITEMS]}
    return {k: _decode(v, tensors, where) for k, v in obj.items()}


def _tensor(tensors: dict[str, torch.Tensor], key: Any, where: str) -> torch.Tensor:
    if not isinstance(key, str) or key not in tensors:
        raise GrassError(
            f"damaged checkpoint: tensor {key!r} is missing",
            where=where,
            hint="resume from an earlier checkpoint in the same folder",
        )
    return tensors[key]


def load_tree(path: Path) -> Any:
    """Read what `save_tree` wrote (JSON and raw tensor bytes only: no code runs)."""
    where = str(_file(path, ".json"))
    try:
        skeleton = json.loads(_file(path, ".json").read_text(encoding="utf-8"))
        st = _file(path, ".safetensors")
        tensors = load_file(str(st), device="cpu") if st.exists() else {}
        return _decode(skeleton, tensors, where)
    except GrassError:
        raise
    except Exception as e:  # malformed JSON, header or tags: refused, never half-read
        raise GrassError(
            f"damaged checkpoint: {path.name} cannot be read ({type(e).__name__})",
            where=where,
            hint="resume from an earlier checkpoint in the same folder",
        ) from None
