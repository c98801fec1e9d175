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
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from grass_cli.errors import GrassError, ModelError
from grass_cli.export.metadata import (
    ARCHITECTURES,
    CONVERTER_HINT,
    QUANTS,
    check_config,
    read_json,
    write_metadata,
)
from grass_cli.export.tensors import (
    interleave_rotary,
    nbytes,
    plan_tensors,
    tensor_sources,
    write_tensors,
)
from grass_cli.export.vocab import Vocab

__all__ = ["ExportResult", "QUANTS", "export_gguf", "export_target", "interleave_rotary"]


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
        return {**asdict(self), "path": str(self.path)}


def export_gguf(
    model_dir: Path, out: Path, quant: str = "f16", name: str | None = None
) -> ExportResult:
    """Write the HF model folder `model_dir` as the GGUF file `out` (`quant` one of
    QUANTS). Checks everything it can before writing a byte; refuses an existing `out`."""
    _check_quant(quant)
    config = read_json(model_dir / "config.json", model_dir)
    arch_name = (config.get("architectures") or ["?"])[0]
    if arch_name not in ARCHITECTURES:
        raise ModelError(
            f"GGUF export knows the llama family (Llama, SmolLM, Mistral) and Qwen2; "
            f"this model is {arch_name}",
            where=str(model_dir),
            hint=CONVERTER_HINT,
        )
    arch, permute_qk = ARCHITECTURES[arch_name]
    check_config(config, model_dir)
    if out.exists():
        raise GrassError(
            "the output file exists and is not replaced",
            where=str(out),
            hint="remove it or pass another --out",
        )
    if not out.parent.is_dir():
        raise GrassError("the output folder does not exist", where=str(out.parent))
    vocab = Vocab.read(model_dir, int(config["vocab_size"]))
    sources = tensor_sources(model_dir)

    import gguf

    plan, fallback = plan_tensors(
        sources, config, arch, gguf.GGMLQuantizationType[QUANTS[quant][0]], model_dir
    )
    notes = _notes(fallback, quant, vocab.pre_tokenizer)
    need = sum(nbytes(shape, t, gguf) for _, _, t, shape in plan)
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
        write_metadata(writer, gguf, config, arch, quant, name or model_dir.name)
        vocab.write(writer, gguf, model_dir)
        params = write_tensors(writer, plan, sources, config, permute_qk)
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
    return ExportResult(
        out, quant, arch, len(plan), params, out.stat().st_size, vocab.pre_tokenizer, notes
    )


def _notes(fallback: int, quant: str, pre: str) -> list[str]:
    notes = []
    if fallback:
        notes.append(
            f"{fallback} matrices have rows that do not divide into {quant} blocks; written f16"
        )
    if pre == "default":
        notes.append(
            "tokenizer.ggml.pre is 'default': llama.cpp may split text into words "
            "differently from this tokenizer; compare with llama-tokenize"
        )
    return notes


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
