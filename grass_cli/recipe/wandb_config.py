"""The recipe's output.wandb section: which W&B project and run a training run logs to.

A section of its own (sections.py holds the others) because only the W&B sink
(grass_cli/telemetry/wandb.py) and pre-flight read it. No wandb import here:
the recipe validates without the package.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from grass_cli.recipe.base import Section, expand_home


class WandbConfig(Section):
    """Weights & Biases logging (output.wandb), beside metrics.jsonl and TensorBoard.

    Needs the extra (pip install 'grass-cli[wandb]'); missing, the run is refused
    before the model loads. The W&B run's id is kept in RUN_DIR/wandb-run-id so
    that --resume continues the same W&B run.
    """

    # W&B refuses the characters / \ # ? % : in project names: checked here, at once.
    project: str = Field("grass", min_length=1, max_length=128)
    # Team or user that owns the project; null: your default entity.
    entity: str | None = None
    # Display name of the run; null: W&B's generated name.
    name: str | None = None
    # Runs to show together (e.g. one sweep's).
    group: str | None = None
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(default_factory=list)
    notes: str | None = None
    # online: stream to the server (needs `wandb login` or WANDB_API_KEY); offline:
    # files only, upload later with `wandb sync`; disabled: log nothing. null: the
    # WANDB_MODE environment variable, else online.
    mode: Literal["online", "offline", "disabled"] | None = None
    # Folder W&B writes under (it adds wandb/); null: the run folder. `~` is expanded.
    dir: str | None = None

    @field_validator("project")
    @classmethod
    def _project(cls, v: str) -> str:
        bad = sorted({c for c in v if c in "/\\#?%:"})
        if bad:
            raise ValueError(f"W&B project names cannot contain {' '.join(bad)}")
        return v

    @field_validator("dir")
    @classmethod
    def _expand_dir(cls, v: str | None) -> str | None:
        return expand_home(v)
