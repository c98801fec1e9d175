"""The command modules stay thin: shared options defined once, small functions and
modules, and the library halves of `grass eval` / `inspect-importance` (target
resolution, probe setup) without loading a model."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import get_type_hints

import pytest
import typer.main
import yaml

from grass_cli.cli import app
from grass_cli.commands import SHARED
from grass_cli.commands.options import (
    DeviceOption,
    FormatOption,
    RowFormat,
    choice_value,
    parse_fields,
)
from grass_cli.errors import GrassError, ModelError
from grass_cli.eval_target import build_config, resolve_target
from grass_cli.importance_report import ProbeRequest, _setup, is_run_dir

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = ROOT / "grass_cli" / "commands"
LIBRARY_HALVES = [ROOT / "grass_cli" / name for name in ("eval_target.py", "importance_report.py")]


def _params(command: str) -> dict[str, object]:
    cmd = typer.main.get_command(app).commands[command]  # type: ignore[attr-defined]
    return {p.opts[0]: p for p in cmd.params}


@pytest.mark.parametrize("path", sorted(COMMANDS.glob("*.py")) + LIBRARY_HALVES, ids=str)
def test_modules_and_functions_stay_small(path):
    source = path.read_text(encoding="utf-8")
    assert len(source.splitlines()) <= 400
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            first = min([d.lineno for d in node.decorator_list] + [node.lineno])
            assert node.end_lineno - first + 1 <= 80, f"{path.name}: {node.name} is too long"


def test_every_command_module_registers_and_shared_ones_are_skipped():
    names = set(typer.main.get_command(app).commands)  # type: ignore[attr-defined]
    assert {"eval", "inspect-importance", "plan", "plot"} <= names
    assert "options" in SHARED and "options" not in names


def test_eval_and_inspect_share_format_and_device():
    """Both signatures name the very same Annotated alias, so one definition drives both."""
    from grass_cli.commands.eval import eval_command
    from grass_cli.commands.inspect import inspect_importance

    ev = get_type_hints(eval_command, include_extras=True)
    ins = get_type_hints(inspect_importance, include_extras=True)
    assert ev["fmt"] == ins["fmt"] == FormatOption
    assert ev["device"] == ins["device"] == DeviceOption
    eval_opts, inspect_opts = _params("eval"), _params("inspect-importance")
    for flag in ("--data", "--field", "--batch-size", "--out", "--json", "--format", "--device"):
        assert flag in eval_opts and flag in inspect_opts


def test_parse_fields():
    assert parse_fields(None) == {}
    assert parse_fields([" prompt = question", "answer=label"]) == {
        "prompt": "question",
        "answer": "label",
    }
    for bad in ("prompt", "=x", "prompt="):
        with pytest.raises(GrassError, match="FIELD=COLUMN"):
            parse_fields([bad])


def test_choice_value_is_none_when_not_given():
    assert choice_value(None) is None
    assert choice_value(RowFormat.chat) == "chat"


def test_eval_targets_and_their_output_folders(tmp_path):
    hub = resolve_target("org/some-model")
    assert (hub.recipe, hub.out_dir, hub.label) == (None, Path("eval-some-model"), "org/some-model")
    gguf = resolve_target(str(tmp_path / "m.gguf"))
    assert gguf.out_dir == tmp_path / "eval-m"
    assert resolve_target("embedded:smollm2-135m-instruct").out_dir == Path(
        "eval-smollm2-135m-instruct"
    )
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    tgt = resolve_target(str(folder))
    assert tgt.model.path == str(folder) and tgt.out_dir == tmp_path / "eval-model"


def test_unfinished_run_dir_and_plain_folder_are_clear_errors(tmp_path):
    (tmp_path / "recipe.yaml").write_text("data:\n  train: t.jsonl\n")
    with pytest.raises(ModelError, match="no final model"):
        resolve_target(str(tmp_path))
    (tmp_path / "plain").mkdir()
    with pytest.raises(ModelError, match="neither a run dir"):
        resolve_target(str(tmp_path / "plain"))


def test_options_override_the_recipes_eval_section_and_none_keeps_it():
    from grass_cli.recipe import validate_dict

    recipe = validate_dict(
        {"data": {"train": "t.jsonl"}, "eval": {"scorer": "numeric", "limit": 5}}, "r.yaml"
    )
    cfg = build_config(recipe, {"limit": 2, "scorer": None})
    assert (cfg.scorer, cfg.limit) == ("numeric", 2)
    with pytest.raises(GrassError, match="invalid eval options: batch_size"):
        build_config(None, {"batch_size": 0})


def test_probe_setup_format_replaces_fields_and_field_adds_to_them(tmp_path):
    recipe = tmp_path / "r.yaml"
    data = {"format": "alpaca", "fields": {"instruction": "q"}, "train": "t.jsonl"}
    recipe.write_text(yaml.safe_dump({"data": data}))
    kept = _setup(ProbeRequest(str(recipe), fields={"output": "a"}))
    assert kept.data.fields == {"instruction": "q", "output": "a"} and kept.name == "r"
    swapped = _setup(ProbeRequest(str(recipe), format="prompt-completion", fields={"prompt": "x"}))
    assert (swapped.data.format, swapped.data.fields) == ("prompt-completion", {"prompt": "x"})
    with pytest.raises(GrassError, match="--data is required"):
        _setup(ProbeRequest("embedded:smollm2-135m-instruct"))


def test_a_run_dir_is_a_folder_with_metrics(tmp_path):
    assert not is_run_dir(str(tmp_path))
    (tmp_path / "metrics.jsonl").write_text("")
    assert is_run_dir(str(tmp_path))


def test_eval_progress_bar_starts_at_the_first_report_and_stops_cleanly():
    from grass_cli.commands.eval import _progress_reporter

    assert _progress_reporter(False) == (None, None)
    bar, report = _progress_reporter(True)
    assert not bar.live.is_started  # not over the model loading
    try:
        report("loss", 1, 4)
        assert bar.live.is_started and bar.tasks[0].completed == 1
        report("loss", 4, 4)
        assert len(bar.tasks) == 1 and bar.tasks[0].completed == 4
    finally:
        bar.stop()
    assert not bar.live.is_started
