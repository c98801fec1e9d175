"""Model presets: the public shape, chat template and learning-rate guidance of the
model families users fine-tune, shipped as small JSON files beside this module.

A preset name (`llama-3.1-8b`) works wherever a model is named: `model.path`
(trained from the preset's hub id; planned and validated from the shipped shape,
so no weight or network is needed to check a recipe), `grass plan --model-config`
and `grass init`. A preset holds no weights: its `config` is a copy of the shape
fields of the model's hub config.json, with the page it was copied from, and its
`lr` says per strategy which peak learning rate to start from and where that
figure comes from. No torch here: `grass validate` stays fast.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from grass_cli.errors import GrassError

PRESETS_DIR = Path(__file__).resolve().parent
TEMPLATES_DIR = PRESETS_DIR / "templates"


@dataclass(frozen=True)
class Preset:
    """One model: where its weights are, its shape, its chat template, its lr guidance."""

    name: str
    title: str
    hub_id: str
    family: str
    params_b: float  # billions, as the model card counts them
    gated: bool  # the hub asks for a licence to be accepted first
    chat_template: str  # a template name: templates/<name>.jinja
    config: dict[str, Any]
    config_source: str
    lr: dict[str, float]  # strategy -> peak learning rate to start from
    lr_source: str
    aliases: tuple[str, ...] = field(default=())

    def template_text(self) -> str | None:
        """The family's chat template, used only when a tokenizer carries none."""
        path = TEMPLATES_DIR / f"{self.chat_template}.jinja"
        return path.read_text(encoding="utf-8") if path.is_file() else None

    def lr_for(self, strategy: str) -> float:
        """The preset's starting lr for a strategy (layer-wise ones share GRASS's)."""
        if strategy in self.lr:
            return self.lr[strategy]
        return self.lr["lora" if strategy == "lora" else "grass"]


def _read(path: Path) -> Preset:
    data = json.loads(path.read_text(encoding="utf-8"))
    data["aliases"] = tuple(data.get("aliases", ()))
    return Preset(**data)


@cache
def _all() -> dict[str, Preset]:
    return {p.stem: _read(p) for p in sorted(PRESETS_DIR.glob("*.json"))}


def preset_names() -> list[str]:
    """Every shipped preset, sorted."""
    return list(_all())


def find_preset(name: str) -> Preset | None:
    """The preset a name means: its own name (any case), an alias, or its hub id."""
    key = name.strip().lower()
    for preset in _all().values():
        if key in (preset.name, preset.hub_id.lower(), *preset.aliases):
            return preset
    return None


def is_preset_name(name: str) -> bool:
    """A bare preset name (not a hub id: those stay hub ids wherever they are given)."""
    return "/" not in name and find_preset(name) is not None


def close_presets(name: str, cutoff: float = 0.8) -> list[str]:
    """Preset names spelled like `name` (a typo such as llama-3.1-9b)."""
    return difflib.get_close_matches(name.lower(), preset_names(), n=3, cutoff=cutoff)


def get_preset(name: str, where: str) -> Preset:
    """The preset `name` means, or one error listing the close ones and all of them."""
    preset = find_preset(name)
    if preset is not None:
        return preset
    names = preset_names()
    close = close_presets(name, cutoff=0.5)
    hint = ("did you mean " + " or ".join(close) + "? ") if close else ""
    raise GrassError(
        f"unknown model preset {name!r}",
        where=where,
        hint=hint + "presets: " + ", ".join(names),
    )
