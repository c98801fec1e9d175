"""A byte-level BPE tokenizer as GGUF's token list, types and merges, with the name
of its pre-tokenizer as llama.cpp knows it (grass_cli/export/__init__.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from grass_cli.errors import ModelError
from grass_cli.export.metadata import CONVERTER_HINT, read_json

_GPT2_BYTE_LEVEL = {"type": "ByteLevel", "use_regex": True}


class Vocab:
    """A byte-level BPE tokenizer as GGUF's token list, types and merges."""

    def __init__(self, tokens: list[str], types: list[int], merges: list[str], pre: str):
        self.tokens, self.types, self.merges, self.pre_tokenizer = tokens, types, merges, pre

    @classmethod
    def read(cls, model_dir: Path, n_vocab: int) -> Vocab:
        import gguf

        tj = read_json(model_dir / "tokenizer.json", model_dir)
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
