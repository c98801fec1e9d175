"""The tensors of a GGUF export: read from safetensors a tensor at a time, named as
llama.cpp names them, typed (quantized, or f32 for norms and biases), reordered
for llama's rotary layout, and streamed into the writer (grass_cli/export/__init__.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from grass_cli.errors import ModelError
from grass_cli.export.metadata import CONVERTER_HINT

# (HF name, llama.cpp name, GGML type, shape) of each tensor written, in file order
Plan = list[tuple[str, str, Any, tuple[int, ...]]]


def plan_tensors(sources: Sources, config: dict[str, Any], arch: str, qtype: Any,
                 model_dir: Path) -> tuple[Plan, int]:  # fmt: skip
    """Every tensor to write and its type; and how many matrices fell back to f16
    because their rows do not divide into `qtype`'s blocks."""
    import gguf

    plain = plain_types(gguf)
    names = gguf.get_tensor_name_map(
        gguf.MODEL_ARCH[arch.upper()], int(config["num_hidden_layers"])
    )
    tied = bool(config.get("tie_word_embeddings", False))
    plan: Plan = []
    fallback = 0
    for hf_name, shape in sources.shapes.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue  # computed from the config / the embedding itself in llama.cpp
        new = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise ModelError(
                f"no llama.cpp name for the tensor {hf_name}",
                where=str(model_dir),
                hint=CONVERTER_HINT,
            )
        t = qtype
        if len(shape) == 1:
            t = gguf.GGMLQuantizationType.F32
        elif qtype not in plain and shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            t, fallback = gguf.GGMLQuantizationType.F16, fallback + 1
        plan.append((hf_name, new, t, shape))
    return plan, fallback


def write_tensors(writer: Any, plan: Plan, sources: Sources, config: dict[str, Any],
                  permute_qk: bool) -> int:  # fmt: skip
    """The tensor index, then each tensor's data, one at a time; the parameters written."""
    import gguf
    import numpy as np

    plain = plain_types(gguf)
    for _, new, t, shape in plan:
        if t in plain:
            dtype = np.dtype(plain[t])
            writer.add_tensor_info(new, shape, dtype, int(np.prod(shape)) * dtype.itemsize)
        else:
            bshape = gguf.quants.quant_shape_to_byte_shape(shape, t)
            writer.add_tensor_info(new, bshape, np.dtype(np.uint8), int(np.prod(bshape)), t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    params = 0
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    for hf_name, _, t, _ in plan:
        data = sources.read(hf_name)
        params += data.size
        if permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            data = interleave_rotary(data, heads)
        elif permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            data = interleave_rotary(data, kv_heads)
        writer.write_tensor_data(encode(data, t, gguf))
    return params


def interleave_rotary(w: Any, heads: int) -> Any:
    """Reorder a query/key projection's output rows from the Hugging Face rotary
    layout (per head: the first half of the dimensions rotate with the second half)
    to the original one llama.cpp uses (per head: dimensions 2i and 2i+1 rotate
    together). A weight (rows x cols) or a bias (rows,)."""
    rows = w.shape[0]
    half = rows // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def plain_types(gguf: Any) -> dict[Any, str]:
    """GGML types written as numpy arrays of their own dtype (the rest are bytes)."""
    T = gguf.GGMLQuantizationType
    return {T.F32: "float32", T.F16: "float16"}


def nbytes(shape: tuple[int, ...], t: Any, gguf: Any) -> int:
    block, size = gguf.GGML_QUANT_SIZES[t]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows * (shape[-1] // block) * size


def encode(data: Any, t: Any, gguf: Any) -> Any:
    plain = plain_types(gguf)
    if t in plain:
        return data.astype(plain[t])
    return gguf.quants.quantize(data, t)


class Sources:
    """The model's safetensors, one file or shards: shapes up front, tensors on demand."""

    def __init__(self, files: list[Path]) -> None:
        from safetensors import safe_open

        self.handles = [safe_open(str(f), "pt") for f in files]
        self.where: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for h in self.handles:
            for key in h.keys():  # noqa: SIM118 (safe_open has no __iter__)
                self.where[key] = h
                self.shapes[key] = tuple(h.get_slice(key).get_shape())

    def read(self, name: str) -> Any:
        """The tensor as float32 numpy (through torch: numpy has no bfloat16)."""
        return self.where[name].get_tensor(name).float().numpy()


def tensor_sources(model_dir: Path) -> Sources:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(
            "the model folder has no .safetensors weights",
            where=str(model_dir),
            hint="grass saves safetensors; a folder with .bin weights needs "
            "`save_pretrained(..., safe_serialization=True)` first",
        )
    return Sources(files)
