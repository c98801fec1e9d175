"""Eval prompts: a row's prompt as the exact tokens a training row has before its answer.

A thin layer over the data package's `RowRenderer.prompt`, the renderer training
uses, so evaluation cannot drift from how the model was trained.
"""

from __future__ import annotations

from typing import Any

from grass_cli.data import RowRenderer, mapped_columns
from grass_cli.recipe import DataConfig


class PromptRenderer:
    """A row's prompt text and token ids, as training renders them before the answer.

    With a chat template: the conversation up to the answer, rendered with
    `add_generation_prompt=True` (system prompt inserted as in training). Without:
    the tokenizer's BOS prefix, then the prompt text, no separator (the user
    controls spacing, as in training).
    """

    def __init__(self, data_cfg: DataConfig, tokenizer: Any):
        self.cfg = data_cfg
        self.tokenizer = tokenizer
        self.renderer = RowRenderer(data_cfg, tokenizer)  # decides template use as training does
        # By the mapping alone: an eval file may lack the answer column training needs.
        self.columns = mapped_columns(data_cfg.format, dict(data_cfg.fields))

    @property
    def use_template(self) -> bool:
        return self.renderer.use_template

    @property
    def template(self) -> str | None:
        """The chat template's text the prompts are rendered with (None: plain text)."""
        return self.renderer.template

    def text(self, row: dict[str, Any], where: str) -> tuple[str, str, str | None]:
        """(prompt text fed to the tokenizer, the user-visible prompt, the reference answer)."""
        prompt = self.renderer.prompt(row, self.columns, where)
        return prompt.text, prompt.user, prompt.answer

    def ids(self, texts: list[str]) -> list[list[int]]:
        """Token ids of rendered prompts (no special tokens added; BOS prefix as training)."""
        if not texts:
            return []
        prefix = [] if self.use_template else list(self.renderer.prefix)
        enc = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [prefix + list(e) for e in enc]
