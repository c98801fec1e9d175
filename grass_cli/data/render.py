"""Rendering rows into text: the one prompt renderer training and evaluation share.

Each row is rendered into *segments*: pieces of text (or token ids) with a flag
saying whether the model is trained on them. Segments are tokenized separately (no
special tokens added) and concatenated, so the loss mask lines up with the tokens
exactly; no offset mapping or string search is involved. Tokenizing the answer
separately from its prompt is also what happens at inference, where the prompt is
encoded and the model then emits the answer token by token.

`RowRenderer.prompt` gives the text a training row has before its answer, so an
evaluated model is prompted exactly as it was trained. Conversations (the chat and
ShareGPT formats) are first read into [{role, content}] with the chat roles, so
both render, and tokenize, identically.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from grass_cli.data.checks import root_cause
from grass_cli.data.rows import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_NO_INPUT,
    ANSWER_FIELDS,
    CONVERSATION_FIELDS,
    conversation_field,
    role_map,
    text_field,
)
from grass_cli.data.templates import CHAT_FORMATS, resolve_template, template_label
from grass_cli.errors import DataError
from grass_cli.recipe import DataConfig

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# A rendered piece of a row: text (or ready token ids) and whether it is trained.
Segment = tuple[str | list[int], bool]
Columns = dict[str, str | None]
Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Prompt:
    """The prompt side of a row, as training renders it before the answer."""

    text: str  # what is tokenized: the templated conversation, or the plain prompt
    user: str  # what the user asked: the last user turn, instruction (+ input), prompt
    answer: str | None  # the answer training trains on; None when absent or not text


def special_prefix(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Ids the tokenizer puts before text on its own (a BOS for Llama; none for SmolLM2).

    Template-free rendering tokenizes without special tokens, so the BOS a model was
    trained with must be added back explicitly.
    """
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for k in range(len(full) - len(plain) + 1):
        if full[k : k + len(plain)] == plain:
            return list(full[:k])
    return []


class RowRenderer:
    """Turns one validated row into segments (training) or its prompt (evaluation),
    with or without a chat template, as decided once by `resolve_template`.

    `template` is the chosen template's text (None: plain text); every render
    passes it to `apply_chat_template`, so a named or file template is used
    exactly like the tokenizer's own.
    """

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase):
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.template = resolve_template(cfg.format, cfg.chat_template, tokenizer)
        self.use_template = self.template is not None
        self.roles = role_map(cfg.format, cfg.roles) if cfg.format in CHAT_FORMATS else {}
        eos = tokenizer.eos_token_id
        if not self.use_template and eos is None:
            raise DataError(
                "the tokenizer has no end-of-sequence token to end rows with",
                where="data.chat_template",
                hint="use a model whose tokenizer defines eos_token",
            )
        self.eos: list[int] = [] if eos is None else [int(eos)]
        self.prefix = [] if self.use_template else special_prefix(tokenizer)

    def _with_system(self, messages: Messages) -> Messages:
        """`messages` with data.system_prompt first, unless it starts with a system turn."""
        if self.cfg.system_prompt is None or (messages and messages[0]["role"] == "system"):
            return messages
        return [{"role": "system", "content": self.cfg.system_prompt}, *messages]

    def _conversation(
        self, row: dict[str, Any], columns: Columns, where: str, need_assistant: bool = True
    ) -> Messages:
        """A chat or ShareGPT row's turns as [{role, content}] with the chat roles.

        A ShareGPT row's `system` column (LLaMA-Factory's) opens the conversation
        unless it starts with its own system turn; data.system_prompt comes after
        both, in `_with_system`.
        """
        fmt = self.cfg.format
        col = columns[CONVERSATION_FIELDS[fmt]]
        assert col is not None
        messages = conversation_field(row, col, where, fmt, self.roles, need_assistant)
        if fmt == "sharegpt" and messages[0]["role"] != "system":
            system = text_field(row, "system", columns.get("system"), where, optional=True)
            if system:
                messages = [{"role": "system", "content": system}, *messages]
        return messages

    def _instruction(self, row: dict[str, Any], columns: Columns, where: str) -> tuple[str, str]:
        """(user text, template-free prompt) of an alpaca or prompt-completion row."""
        if self.cfg.format == "alpaca":
            instruction = text_field(row, "instruction", columns["instruction"], where)
            extra = text_field(row, "input", columns["input"], where, optional=True)
            user = instruction + ("\n\n" + extra if extra else "")
            if extra:
                return user, ALPACA_PROMPT.format(instruction=instruction, input=extra)
            return user, ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
        prompt = text_field(row, "prompt", columns["prompt"], where)
        return prompt, prompt

    def render(self, row: dict[str, Any], columns: Columns, where: str) -> list[Segment]:
        """A training row: its segments, the answer (and end-of-turn) trained."""
        fmt, tp = self.cfg.format, self.cfg.train_on_prompt
        if fmt in CHAT_FORMATS:
            return self._chat(self._with_system(self._conversation(row, columns, where)), where)
        if fmt == "text":
            text = text_field(row, "text", columns["text"], where)
            return [(self.prefix, False), (text, True), (self.eos, True)]
        user, prompt = self._instruction(row, columns, where)
        answer_field = ANSWER_FIELDS[fmt]
        answer = text_field(row, answer_field, columns[answer_field], where)
        if self.use_template:
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
            return self._chat(self._with_system(messages), where)
        # No separator between prompt and answer: the user controls spacing.
        return [(self.prefix, False), (prompt, tp), (answer, True), (self.eos, True)]

    def prompt(self, row: dict[str, Any], columns: Columns, where: str) -> Prompt:
        """The text a training row has before its answer, to generate or score from.

        A chat row's prompt is the conversation up to its last assistant turn (that
        turn is the answer), rendered with the generation prompt. Without a chat
        template the text has no BOS: it is `prefix`, prepended as token ids.
        """
        fmt = self.cfg.format
        if fmt == "text":
            raise DataError(
                "the text format has no prompt to generate from",
                where=where,
                hint="use the prompt-completion, alpaca or chat format",
            )
        if fmt in CHAT_FORMATS:
            messages = self._conversation(row, columns, where, need_assistant=False)
            last = max(
                (i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None
            )
            answer = messages[last]["content"] if last is not None else None
            context = messages[:last] if last is not None else messages
            if context:
                context = self._with_system(context)
            user = next((m["content"] for m in reversed(context) if m["role"] == "user"), "")
            return Prompt(self.apply_template(context, True, where), user, answer)
        user, plain = self._instruction(row, columns, where)
        value = row.get(columns[ANSWER_FIELDS[fmt]] or "")
        answer = value if isinstance(value, str) else None
        if not self.use_template:
            return Prompt(plain, user, answer)
        messages = self._with_system([{"role": "user", "content": user}])
        return Prompt(self.apply_template(messages, True, where), user, answer)

    def apply_template(self, messages: Messages, generation: bool, where: str) -> str:
        """The chat template's text for `messages`; a refusal becomes a row's DataError."""
        label = template_label(self.cfg.chat_template)
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.template,
                tokenize=False,
                add_generation_prompt=generation,
            )
        except Exception as e:  # jinja raise_exception(), bad role order, ...
            line = getattr(e, "lineno", None)
            if type(e).__name__ == "TemplateSyntaxError":  # the template, not the row
                raise DataError(
                    f"{label} is not valid Jinja (line {line}): {root_cause(e)}",
                    where="data.chat_template",
                ) from None
            raise DataError(
                f"{label} rejected this conversation: {root_cause(e)}",
                where=where,
                hint="check the role order the model expects (e.g. user/assistant alternating)",
            ) from None
        if not isinstance(text, str):
            raise DataError("the chat template did not render to text", where=where)
        return text

    def _chat(self, messages: Messages, where: str) -> list[Segment]:
        """Segments of a conversation: assistant turns trained, everything else masked.

        Each assistant turn's text is what its full render adds to the render of the
        conversation before it with the generation prompt, so it includes the
        end-of-turn token (`<|im_end|>` and newline for ChatML) that teaches the
        model to stop. That needs each render to extend the previous one; templates
        that rewrite earlier turns (e.g. dropping past reasoning) are refused.
        """
        tp = self.cfg.train_on_prompt
        segments: list[Segment] = []
        done = ""
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.apply_template(messages[:i], True, where)
            full = self.apply_template(messages[: i + 1], False, where)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise DataError(
                    f"the model's chat template does not render message {i + 1} as an "
                    "extension of the conversation before it, so the assistant tokens "
                    "cannot be located",
                    where=where,
                    hint="use data.chat_template: never with the prompt-completion format, "
                    "or a model whose template renders turns append-only",
                )
            segments.append((prompt[len(done) :], tp))
            segments.append((full[len(prompt) :], True))
            done = full
        if messages[-1]["role"] != "assistant":  # trailing turns: context only
            full = self.apply_template(messages, False, where)
            if not full.startswith(done):
                raise DataError(
                    "the model's chat template does not render the last messages as an "
                    "extension of the conversation before them",
                    where=where,
                    hint="end each conversation with an assistant message",
                )
            segments.append((full[len(done) :], tp))
        return segments
