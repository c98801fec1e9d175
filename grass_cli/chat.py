"""A conversation with a model: `grass chat`'s library side (the command prints).

Each turn is rendered as training renders a conversation (the run's chat template
and system prompt, grass_cli/data/render.py) and decoded until the tokens that end
an answer in `grass eval` (eos, the template's end-of-turn token): the answer a chat
gives is the answer evaluation scores. Greedy by default, token for token what
`grass eval --kind generate` produces for the same prompt (tested); `temperature`
above 0 samples, with `top_p` nucleus filtering, from a seeded generator.

Decoding is a plain loop over the model's KV cache, so the text streams as it is
made: `reply` yields pieces of text. A model without a chat template answers each
message on its own (plain text has no turns to keep a history in).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from grass_cli.data.render import RowRenderer, special_prefix
from grass_cli.evaluate.generation import stop_token_ids
from grass_cli.recipe import DataConfig

Message = dict[str, str]


@dataclass
class Sampling:
    """How tokens are chosen: greedy at temperature 0, else sampled."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError("temperature must be at least 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")


class ChatSession:
    """The history of one conversation, and the model that answers in it.

    `data` is the run's data section (its chat template and system prompt); None
    uses the tokenizer's own template. `system` sets a system turn (or replaces the
    recipe's `data.system_prompt`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        device: torch.device,
        data: DataConfig | None = None,
        sampling: Sampling | None = None,
        system: str | None = None,
    ) -> None:
        cfg = data if data is not None else DataConfig(train="chat")
        # the conversation format renders [{role, content}] turns as training does
        cfg = cfg.model_copy(update={"format": "chat", "fields": {}, "roles": {}})
        self.model, self.tokenizer, self.device = model, tokenizer, device
        self.sampling = sampling or Sampling()
        self.renderer = _renderer(cfg, tokenizer)
        self.system = system if system is not None else cfg.system_prompt
        self.history: list[Message] = []
        self.stop_ids = stop_token_ids(model, tokenizer, self.renderer.template)
        self._rng = torch.Generator().manual_seed(self.sampling.seed)

    @property
    def keeps_history(self) -> bool:
        """False for a model without a chat template: each message stands alone."""
        return self.renderer.use_template

    def reset(self) -> None:
        """Forget the conversation (the system turn stays)."""
        self.history.clear()

    def set_system(self, text: str | None) -> None:
        """A new system turn (None or empty: none); the conversation starts over."""
        self.system = text or None
        self.reset()

    def prompt_ids(self, user: str) -> list[int]:
        """The token prefix the model continues: the history, this user turn, and the
        template's opening of the assistant turn."""
        if not self.keeps_history:
            ids = self.tokenizer(user, add_special_tokens=False)["input_ids"]
            return special_prefix(self.tokenizer) + list(ids)
        turns = [*self.history, {"role": "user", "content": user}]
        if self.system:
            turns = [{"role": "system", "content": self.system}, *turns]
        text = self.renderer.apply_template(turns, True, "the conversation")
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def reply(self, user: str) -> Iterator[str]:
        """The answer to `user`, as pieces of text while it is generated; the turn
        joins the history when the answer ends."""
        pieces: list[str] = []
        for piece in self._generate(self.prompt_ids(user)):
            pieces.append(piece)
            yield piece
        if self.keeps_history:
            answer = "".join(pieces)
            self.history.append({"role": "user", "content": user})
            self.history.append({"role": "assistant", "content": answer})

    @torch.no_grad()
    def _generate(self, prompt: list[int]) -> Iterator[str]:
        """Token by token over the KV cache; text is yielded once it decodes whole (a
        multi-byte character split across tokens waits for its last byte)."""
        lm = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        # the KV cache's keyword: `cache` in transformers 5.25+, `past_key_values` before
        key = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        past, new, shown = None, [], ""
        for _ in range(self.sampling.max_new_tokens):
            out = lm(input_ids=ids, use_cache=True, **{key: past})
            past = getattr(out, key)
            tok = self._pick(out.logits[0, -1].float())
            if tok in self.stop_ids:
                break
            new.append(tok)
            text = self.tokenizer.decode(new, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete character: wait for the rest
                ids = torch.tensor([[tok]], dtype=torch.long, device=self.device)
                continue
            if len(text) > len(shown):
                yield text[len(shown) :]
                shown = text
            ids = torch.tensor([[tok]], dtype=torch.long, device=self.device)

    def _pick(self, logits: torch.Tensor) -> int:
        s = self.sampling
        if s.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.cpu() / s.temperature, dim=-1)
        if s.top_p < 1:
            sorted_p, order = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < s.top_p  # the nucleus, >= 1 token
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self._rng))


def _renderer(cfg: DataConfig, tokenizer: Any) -> RowRenderer:
    """The run's renderer; a tokenizer without a chat template renders plain text."""
    from grass_cli.errors import DataError

    try:
        return RowRenderer(cfg, tokenizer)
    except DataError:  # the chat format needs a template this tokenizer lacks
        return RowRenderer(cfg.model_copy(update={"format": "prompt-completion"}), tokenizer)
