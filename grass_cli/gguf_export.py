"""A trained model as one GGUF file, the format llama.cpp, Ollama and LM Studio run.

llama.cpp's own converter (convert_hf_to_gguf.py) is a script in its repository,
not a package on PyPI; the `gguf` package it is built on is. So grass converts with
that package's pieces: `GGUFWriter` for the file, `TensorNameMap` for llama.cpp's
tensor names, `gguf.quants` for the block formats and `SpecialVocab` for the
special tokens and chat template. What is ours is the choice of what to write:

- Architectures: the llama family (Llama 2/3, SmolLM, TinyLlama, Mistral: llama.cpp
  runs them all as `llama`) and Qwen2. Anything else is one message naming
  llama.cpp's converter, not a file that fails later in someone else's tool.
- Llama's query and key rows are reordered from the Hugging Face rotary layout
  (the two halves of each head) into llama.cpp's (pairs interleaved); transformers
  undoes it when it reads the file back, which the tests check logit for logit.
- Byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, Qwen2) only; the vocab
  keeps the model's size, padded with unused tokens where the embedding is larger.
- Norms and biases stay float32 (as llama.cpp keeps them); a matrix whose rows do
  not divide into a quantized format's blocks is written f16, and the result says so.
- The file is streamed a tensor at a time (memory is one tensor, not the model),
  into a hidden temporary sibling that is linked into place only when complete:
  an interrupted export leaves no half file, and an existing file is never replaced.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grass_cli.errors import GrassError, ModelError

# --quant -> (GGML tensor type, llama.cpp's file type) names in the gguf package
QUANTS = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
# HF architecture -> (llama.cpp architecture, whether q/k rows are reordered)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
}
CONVERTER_HINT = (
    "llama.cpp's converter handles more: python convert_hf_to_gguf.py MODEL_DIR "
    "(https://github.com/ggml-org/llama.cpp)"
)
# tokenizer.json pre-tokenizers -> llama.cpp's name for the same splitting rule
_GPT2_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}


@dataclass
class ExportResult:
    """What `export_gguf` wrote."""

    path: Path
    quant: str
    architecture: str
    tensors: int
    params: int
    bytes: int
    pre_tokenizer: str
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "quant": self.quant,
            "architecture": self.architecture,
            "tensors": self.tensors,
            "params": self.params,
            "bytes": self.bytes,
            "pre_tokenizer": self.pre_tokenizer,
            "notes": self.notes,
        }


def export_gguf(
    model_dir: Path, out: Path, quant: str = "f16", name: str | None = None
) -> ExportResult:
    """Write the HF model folder `model_dir` as the GGUF file `out` (`quant` one of
    QUANTS). Checks everything it can before writing a byte; refuses an existing `out`."""
    _check_quant(quant)
    config = _read_json(model_dir / "config.json", model_dir)
    arch_name = (config.get("architectures") or ["?"])[0]
    if arch_name not in ARCHITECTURES:
        raise ModelError(
            f"GGUF export knows the llama family (Llama, SmolLM, Mistral) and Qwen2; "
            f"this model is {arch_name}",
            where=str(model_dir),
            hint=CONVERTER_HINT,
        )
    arch, permute_qk = ARCHITECTURES[arch_name]
    _check_config(config, model_dir)
    if out.exists():
        raise GrassError(
            "the output file exists and is not replaced",
            where=str(out),
            hint="remove it or pass another --out",
        )
    if not out.parent.is_dir():
        raise GrassError("the output folder does not exist", where=str(out.parent))
    vocab = _Vocab.read(model_dir, int(config["vocab_size"]))
    sources = _tensor_sources(model_dir)

    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[QUANTS[quant][0]]
    plain = _plain(gguf)
    n_blocks = int(config["num_hidden_layers"])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_blocks)
    tied = bool(config.get("tie_word_embeddings", False))
    plan: list[tuple[str, str, Any, tuple[int, ...]]] = []  # (hf, gguf name, type, shape)
    notes: list[str] = []
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
    if fallback:
        notes.append(
            f"{fallback} matrices have rows that do not divide into {quant} blocks; written f16"
        )
    pre = vocab.pre_tokenizer
    if pre == "default":
        notes.append(
            "tokenizer.ggml.pre is 'default': llama.cpp may split text into words "
            "differently from this tokenizer; compare with llama-tokenize"
        )

    need = sum(_nbytes(shape, t, gguf) for _, _, t, shape in plan)
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise GrassError(
            f"the file needs about {need / 1e9:.2f} GB and its folder's disk has "
            f"{free / 1e9:.2f} GB free",
            where=str(out),
            hint="free some space, pass --out on another disk, or a smaller --quant",
        )
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex}.tmp")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        _write_metadata(writer, gguf, config, arch, quant, name or model_dir.name)
        vocab.write(writer, gguf, model_dir)
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
            writer.write_tensor_data(_encode(data, t, gguf))
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _link_new(tmp, out)
    except BaseException as e:
        writer.close()
        from grass_cli.atomic import describe_write_error

        reason = describe_write_error(e, tmp) if isinstance(e, OSError) else None
        with contextlib.suppress(OSError):
            tmp.unlink()
        if reason is not None:
            raise GrassError(reason, where=str(out)) from None
        raise
    return ExportResult(out, quant, arch, len(plan), params, out.stat().st_size, pre, notes)


def export_target(target: str, quant: str = "f16", out: Path | None = None) -> ExportResult:
    """`grass export TARGET`: a run dir (its final model), a model folder (a
    checkpoint), or any model `model.path` accepts (a .gguf, a hub id, embedded:...).

    The default file goes into the run dir, never among its checkpoints (which
    --overwrite and checkpoint.keep_last clear): RUN_DIR/RUN-QUANT.gguf for the run's
    final model, RUN_DIR/RUN-step-N-QUANT.gguf for a checkpoint; FOLDER-QUANT.gguf
    beside a model folder outside any run; ./NAME-QUANT.gguf for anything else."""
    from grass_cli.eval_target import resolve_target
    from grass_cli.models import resolve_model_path

    _check_quant(quant)  # before minutes of model conversion
    p = Path(target).expanduser().resolve()
    tgt = resolve_target(target)
    model_dir = Path(resolve_model_path(tgt.model.path))
    run = next((d for d in (p, p.parent, p.parent.parent) if (d / "recipe.yaml").is_file()), None)
    if p.is_dir() and run is not None:
        name = run.name if p in (run, run / "final") else f"{run.name}-{p.name}"
        default = run / f"{name}-{quant}.gguf"
    elif p.is_dir():
        name, default = p.name, p.parent / f"{p.name}-{quant}.gguf"
    else:
        name = target.rstrip("/").split("/")[-1].split(":")[-1].removesuffix(".gguf") or "model"
        default = Path(f"{name}-{quant}.gguf")
    return export_gguf(model_dir, out if out is not None else default, quant, name)


def _check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise GrassError(
            f"unknown GGUF type {quant!r}", where="--quant", hint="choices: " + ", ".join(QUANTS)
        )


def interleave_rotary(w: Any, heads: int) -> Any:
    """Reorder a query/key projection's output rows from the Hugging Face rotary
    layout (per head: the first half of the dimensions rotate with the second half)
    to the original one llama.cpp uses (per head: dimensions 2i and 2i+1 rotate
    together). A weight (rows x cols) or a bias (rows,)."""
    rows = w.shape[0]
    half = rows // heads // 2
    return w.reshape(heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------------- the pieces


def _plain(gguf: Any) -> dict[Any, str]:
    """GGML types written as numpy arrays of their own dtype (the rest are bytes)."""
    T = gguf.GGMLQuantizationType
    return {T.F32: "float32", T.F16: "float16"}


def _nbytes(shape: tuple[int, ...], t: Any, gguf: Any) -> int:
    block, size = gguf.GGML_QUANT_SIZES[t]
    rows = 1
    for d in shape[:-1]:
        rows *= d
    return rows * (shape[-1] // block) * size


def _encode(data: Any, t: Any, gguf: Any) -> Any:
    plain = _plain(gguf)
    if t in plain:
        return data.astype(plain[t])
    return gguf.quants.quantize(data, t)


def _read_json(path: Path, model_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError(
            "not a Hugging Face model folder (no config.json)", where=str(model_dir)
        ) from None
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {path.name}: {e}", where=str(model_dir)) from None
    if not isinstance(data, dict):
        raise ModelError(f"{path.name} is not a JSON object", where=str(model_dir))
    return data


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope theta, the scaling dict or None); transformers 5 keeps both in
    rope_parameters, 4.x in rope_theta and rope_scaling."""
    params = config.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    scaling = config.get("rope_scaling")
    kind = params.get("rope_type") or params.get("type")
    if kind and kind != "default":
        scaling = params
    return theta, scaling


def _check_config(config: dict[str, Any], model_dir: Path) -> None:
    _, scaling = _rope(config)
    kind = (scaling or {}).get("rope_type") or (scaling or {}).get("type")
    if scaling and kind != "linear":
        raise ModelError(
            f"GGUF export writes plain and linear rotary embeddings; this model uses "
            f"{kind!r} rotary scaling",
            where=str(model_dir),
            hint=CONVERTER_HINT,
        )
    if config.get("hidden_act", "silu") != "silu":
        raise ModelError(
            f"the llama family in llama.cpp uses SiLU; this model's hidden_act is "
            f"{config['hidden_act']!r}",
            where=str(model_dir),
            hint=CONVERTER_HINT,
        )


def _write_metadata(
    writer: Any, gguf: Any, config: dict[str, Any], arch: str, quant: str, name: str
) -> None:
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    writer.add_type("model")
    writer.add_name(name)
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or heads))
    theta, scaling = _rope(config)
    writer.add_rope_freq_base(theta)
    if scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_vocab_size(int(config["vocab_size"]))
    head_dim = int(config.get("head_dim") or hidden // heads)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != hidden // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(gguf.LlamaFileType[QUANTS[quant][1]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


class _Sources:
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


def _tensor_sources(model_dir: Path) -> _Sources:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelError(
            "the model folder has no .safetensors weights",
            where=str(model_dir),
            hint="grass saves safetensors; a folder with .bin weights needs "
            "`save_pretrained(..., safe_serialization=True)` first",
        )
    return _Sources(files)


class _Vocab:
    """A byte-level BPE tokenizer as GGUF's token list, types and merges."""

    def __init__(self, tokens: list[str], types: list[int], merges: list[str], pre: str):
        self.tokens, self.types, self.merges, self.pre_tokenizer = tokens, types, merges, pre

    @classmethod
    def read(cls, model_dir: Path, n_vocab: int) -> _Vocab:
        import gguf

        tj = _read_json(model_dir / "tokenizer.json", model_dir)
        model = tj.get("model") or {}
        if model.get("type") != "BPE" or not _byte_level(tj):
            raise ModelError(
                "GGUF export writes byte-level BPE tokenizers (GPT-2 style: SmolLM, Llama 3, "
                f"Qwen2); this one is {model.get('type', '?')} without byte-level pieces",
                where=str(model_dir / "tokenizer.json"),
                hint=CONVERTER_HINT,
            )
        by_id: dict[int, str] = {int(i): tok for tok, i in model["vocab"].items()}
        kind: dict[int, int] = {}
        T = gguf.TokenType
        for added in tj.get("added_tokens") or []:
            by_id[int(added["id"])] = added["content"]
            kind[int(added["id"])] = T.CONTROL if added.get("special") else T.USER_DEFINED
        if max(by_id) >= n_vocab:
            raise ModelError(
                f"the tokenizer has token ids up to {max(by_id)} but the model's "
                f"vocab_size is {n_vocab}",
                where=str(model_dir),
            )
        tokens, types = [], []
        for i in range(n_vocab):
            if i in by_id:
                tokens.append(by_id[i])
                types.append(int(kind.get(i, T.NORMAL)))
            else:  # embedding rows no token uses (vocab padded to a multiple)
                tokens.append(f"[PAD{i}]")
                types.append(int(T.UNUSED))
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        return cls(tokens, types, merges, _pre_tokenizer(tj.get("pre_tokenizer")))

    def write(self, writer: Any, gguf: Any, model_dir: Path) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre_tokenizer)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        writer.add_token_merges(self.merges)
        # bos / eos / pad / unk ids, add_bos, and the chat template
        gguf.SpecialVocab(model_dir, load_merges=False, n_vocab=len(self.tokens)).add_to_gguf(
            writer, quiet=True
        )


def _byte_level(tj: dict[str, Any]) -> bool:
    def has(node: Any) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "ByteLevel":
            return True
        return any(has(n) for key in ("pretokenizers", "decoders") for n in node.get(key) or [])

    return has(tj.get("pre_tokenizer")) or has(tj.get("decoder"))


def _pre_tokenizer(pre: Any) -> str:
    """llama.cpp's name for the rule that splits text into words before BPE, where
    this tokenizer's rule is one we can recognise: GPT-2's byte-level regex alone
    ('gpt2'), or single digits first and then GPT-2's ('smollm'). Other rules get
    'default', and the export says so."""
    if not isinstance(pre, dict):
        return "default"
    if all(pre.get(k) == v for k, v in _GPT2_BYTE_LEVEL.items()):
        return "gpt2"
    if pre.get("type") == "Sequence":
        parts = pre.get("pretokenizers") or []
        if (
            len(parts) == 2
            and parts[0].get("type") == "Digits"
            and parts[0].get("individual_digits")
            and all(parts[1].get(k) == v for k, v in _GPT2_BYTE_LEVEL.items())
        ):
            return "smollm"
    return "default"


def _link_new(tmp: Path, out: Path) -> None:
    """Give the finished file its name without ever replacing one: a hard link fails
    if `out` appeared meanwhile (then the export stops, the other file untouched)."""
    try:
        os.link(tmp, out)
    except FileExistsError:
        raise GrassError(
            "the output file appeared while exporting and is not replaced",
            where=str(out),
            hint="remove it or pass another --out",
        ) from None
    except OSError:  # a filesystem without hard links
        if out.exists():
            raise
        os.replace(tmp, out)
        return
    tmp.unlink()
