"""`grass push RUN --repo ORG/NAME`: a trained model and its model card to the Hub.

`--dry-run` shows what would be sent (every file, its size, and the card) and sends
nothing. The library side is grass_cli/push.py.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from grass_cli.commands.options import target_argument

TargetArg = Annotated[
    str,
    target_argument(
        "A run dir (its final model, with a card written from the run) or a model "
        "folder inside one (a checkpoint)."
    ),
]
RepoOpt = Annotated[
    str, typer.Option("--repo", help="The Hub repo, ORG/NAME (created if missing).")
]
PrivateOpt = Annotated[bool, typer.Option("--private", help="Create the repo private.")]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Show the files and the card; send nothing.")
]


def push(
    target: TargetArg, repo: RepoOpt, private: PrivateOpt = False, dry_run: DryRunOpt = False
) -> None:
    """Upload a trained model and a model card written from its run to the Hugging Face Hub."""
    from grass_cli.cli import _guard
    from grass_cli.push import hub_token, plan_push
    from grass_cli.push import push as upload

    token = None if dry_run else _guard(hub_token)
    plan = _guard(lambda: plan_push(target, repo, private))
    out = sys.stdout
    out.write(f"{'would upload' if dry_run else 'uploading'} to {repo}"
              f"{' (private)' if private else ''}: {plan.total_bytes / 1e6:.1f} MB\n")  # fmt: skip
    for dest, size in plan.listing():
        out.write(f"  {dest}  {size / 1e6:.2f} MB\n")
    if dry_run:
        out.write("\n--- README.md ---\n" + plan.card)
        return
    assert token is not None
    url = _guard(lambda: upload(plan, token))
    out.write(f"done: {url}\n")


def register(app: typer.Typer) -> None:
    app.command(epilog="Example: grass push runs/quickstart --repo me/smollm2-arith --dry-run")(
        push
    )
