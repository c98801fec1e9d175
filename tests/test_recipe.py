"""Recipe loading, validation messages, overrides, and the `grass validate` command."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from grass_cli.cli import app
from grass_cli.errors import RecipeError
from grass_cli.recipe import all_keys, load_recipe, suggest_key

ROOT = Path(__file__).resolve().parent.parent
REQUIRED_KEYS = [
    "model.path",
    "data.train",
    "data.eval",
    "data.format",
    "sampler.strategy",
    "sampler.gamma",
    "sampler.switch_interval",
    "sampler.probe_steps",
    "sampler.update_interval",
    "sampler.tau",
    "sampler.alpha",
    "sampler.eps",
    "optimizer.lr",
    "optimizer.state_policy",
    "training.max_steps",
    "training.micro_batch_size",
    "training.grad_accum_steps",
    "training.seed",
    "output.dir",
]

runner = CliRunner()


def write(tmp_path: Path, data: dict | str, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def error_of(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(RecipeError) as exc:
        load_recipe(path, overrides)
    return str(exc.value)


def test_documented_keys_exist():
    keys = set(all_keys())
    assert set(REQUIRED_KEYS) <= keys


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").rglob("*.yaml")), ids=str)
def test_every_shipped_recipe_validates(recipe: Path):
    r = load_recipe(recipe)
    assert r.data.train
    # Data paths in shipped recipes are relative to the repo root and exist.
    sources = r.data.train if isinstance(r.data.train, list) else [r.data.train]
    for source in sources:  # a mixture: every source's path
        path = source if isinstance(source, str) else source.path
        assert (ROOT / path).exists(), path


def test_defaults_and_overrides(tmp_path):
    p = write(tmp_path, {"data": {"train": "t.jsonl"}})
    r = load_recipe(
        p,
        [
            "sampler.gamma=4",
            "optimizer.lr=3e-4",
            "sampler.strategy=lisa",
            "optimizer.betas=[0.8, 0.9]",
            "data.eval=e.jsonl",
        ],
    )
    assert r.sampler.gamma == 4 and isinstance(r.sampler.gamma, int)
    assert r.optimizer.lr == pytest.approx(3e-4)
    assert r.sampler.strategy == "lisa"
    assert r.optimizer.betas == (0.8, 0.9)
    assert r.data.eval == "e.jsonl"
    assert r.training.max_steps == 100  # default
    # Round trip: the resolved YAML loads back to the same recipe.
    again = load_recipe(write(tmp_path, r.to_yaml(), "again.yaml"))
    assert again.model_dump() == r.model_dump()


def test_epochs_replace_max_steps(tmp_path):
    p = write(tmp_path, {"data": {"train": "t"}, "training": {"epochs": 2}})
    r = load_recipe(p)
    assert r.training.epochs == 2 and r.training.max_steps is None
    msg = error_of(
        write(tmp_path, {"data": {"train": "t"}, "training": {"epochs": 2, "max_steps": 3}})
    )
    assert "training: set either max_steps or epochs, not both" in msg


def test_unknown_key_suggests_closest(tmp_path):
    p = write(tmp_path, {"data": {"train": "t"}, "sampler": {"gama": 3}})
    msg = error_of(p)
    assert str(p) in msg
    assert "sampler.gama: unknown key (did you mean 'sampler.gamma'?)" in msg


def test_key_in_wrong_section_suggests_right_section(tmp_path):
    msg = error_of(write(tmp_path, {"data": {"train": "t"}, "sampler": {"lr": 1e-3}}))
    assert "sampler.lr: unknown key (did you mean 'optimizer.lr'?)" in msg


def test_all_errors_reported_together(tmp_path):
    p = write(
        tmp_path,
        {
            "data": {"train": "t"},
            "sampler": {"strategy": "lsa", "tau": -1, "gamma": 0},
            "training": {"micro_batch_size": "four"},
        },
    )
    msg = error_of(p)
    assert "invalid recipe (4 errors)" in msg
    assert (
        "sampler.strategy: Input should be 'full', 'lisa', 'grass', 'grass-static', "
        "'cyclic' or 'lora'; got 'lsa'" in msg
    )
    assert "sampler.tau: Input should be greater than 0; got -1" in msg
    assert "sampler.gamma: Input should be a number of blocks (at least 1) or auto; got 0" in msg
    assert "training.micro_batch_size: Input should be a valid integer" in msg and "'four'" in msg


def test_missing_required_key(tmp_path):
    msg = error_of(write(tmp_path, {"model": {"path": "x"}}))
    assert "data: required key is missing" in msg


def test_override_errors(tmp_path):
    p = write(tmp_path, {"data": {"train": "t"}})
    assert "not of the form key.path=value" in error_of(p, ["sampler.gamma"])
    msg = error_of(p, ["sampler.gamma=-2"])
    assert (
        "sampler.gamma: Input should be a number of blocks (at least 1) or auto; got -2 "
        "(from a command-line override)" in msg
    )
    msg = error_of(p, ["sampler.gammma=2"])
    assert "did you mean 'sampler.gamma'?" in msg
    msg = error_of(p, ["sampler.gamma.x=2"])
    assert (
        "sampler.gamma: Input should be a number of blocks (at least 1) or auto; got a "
        "section with keys ['x']" in msg
    )
    p2 = write(tmp_path, {"data": {"train": "t"}, "sampler": {"gamma": 2}}, "g.yaml")
    assert "sampler.gamma is a value, not a section" in error_of(p2, ["sampler.gamma.x=2"])


def test_malformed_yaml_has_line_and_column(tmp_path):
    p = write(tmp_path, "data:\n  train: t\nsampler:\n  gamma: [1, 2\n")
    msg = error_of(p)
    assert msg.startswith(f"{p}:5:1: malformed YAML") or msg.startswith(f"{p}:4:")


def test_not_a_mapping_and_missing_file(tmp_path):
    assert "must be a mapping of sections, got list" in error_of(write(tmp_path, "- a\n- b\n"))
    assert "recipe file not found" in error_of(tmp_path / "nope.yaml")


def test_gamma_checked_against_model(tmp_path):
    r = load_recipe(write(tmp_path, {"data": {"train": "t"}, "sampler": {"gamma": 9}}))
    with pytest.raises(RecipeError) as exc:
        r.check_against_model(num_blocks=4, max_positions=2048)
    assert "sampler.gamma is 9 but the model has only 4 blocks" in str(exc.value)
    assert "set sampler.gamma to at most 4" in str(exc.value)
    r2 = load_recipe(write(tmp_path, {"data": {"train": "t", "max_length": 4096}}, "b.yaml"))
    with pytest.raises(RecipeError, match="data.max_length is 4096 but the model handles at most"):
        r2.check_against_model(num_blocks=4, max_positions=2048)
    # full ignores gamma
    r3 = load_recipe(
        write(
            tmp_path,
            {"data": {"train": "t"}, "sampler": {"strategy": "full", "gamma": 9}},
            "c.yaml",
        )
    )
    r3.check_against_model(num_blocks=4, max_positions=None)


def test_suggest_key_none_for_garbage():
    assert suggest_key("zzzz.qqqq") is None


def test_cli_validate_prints_its_verdict_and_the_resolved_recipe_on_request(tmp_path):
    # validate checks what the recipe points at too (tests/test_preflight.py): real files
    train = Path(__file__).resolve().parent.parent / "data/quickstart/train.jsonl"
    p = write(tmp_path, {"data": {"train": str(train)}, "output": {"dir": str(tmp_path / "r")}})
    res = runner.invoke(app, ["validate", str(p), "sampler.gamma=3"])
    assert res.exit_code == 0, res.output
    assert res.stdout == ""  # the verdict alone, on stderr: no 90 lines of YAML before it
    assert res.stderr.startswith(f"{p}: valid (135M parameters; data.train 2000 rows;")
    res = runner.invoke(app, ["validate", str(p), "sampler.gamma=3", "--print"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.stdout)["sampler"]["gamma"] == 3


def test_cli_validate_error_exit_2_no_traceback(tmp_path):
    p = write(tmp_path, {"data": {"train": "t"}, "sampler": {"gama": 3}})
    res = runner.invoke(app, ["validate", str(p)])
    assert res.exit_code == 2
    assert "Error:" in res.stderr and "did you mean 'sampler.gamma'?" in res.stderr
    assert "Traceback" not in res.output


def test_help_is_fast_and_does_not_import_torch():
    code = (
        "import sys, time; t=time.perf_counter(); import grass_cli.cli; "
        "print(time.perf_counter()-t); print('torch' in sys.modules, "
        "'transformers' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[1:] == ["False", "False"]
    # CPU time of the child, not wall time: stays meaningful on a loaded machine.
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run(
        [sys.executable, "-m", "grass_cli", "--help"], capture_output=True, text=True
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert res.returncode == 0 and "train" in res.stdout and "validate" in res.stdout
    assert cpu < 1.0, f"grass --help used {cpu:.2f}s of CPU"


def test_recipe_reference_documents_every_key():
    text = (ROOT / "docs/recipes.md").read_text()
    missing = [k for k in all_keys() if f"`{k}`" not in text]
    assert not missing, f"docs/recipes.md lacks {missing}"


def test_section_given_where_a_value_belongs_with_null_and_int_keys(tmp_path):
    # YAML allows null and integer keys; the message must list them, not crash sorting them.
    p = write(tmp_path, "data:\n  train: t\noptimizer:\n  state_policy: {null: 1, b: 2, 3: 4}\n")
    msg = error_of(p)
    assert "optimizer.state_policy: Input should be 'keep', 'drop' or 'offload'" in msg
    assert "got a section with keys ['3', 'None', 'b']" in msg


# ------------------------------------------------------------- safety of the values


def test_duplicate_keys_are_errors_naming_the_key_and_both_lines(tmp_path):
    # PyYAML keeps the last of two equal keys: the second `optimizer:` section
    # silently replaced the first.
    p = write(
        tmp_path,
        "data:\n  train: t\noptimizer:\n  lr: 1e-3\nsampler: {}\noptimizer:\n  eps: 1e-6\n",
    )
    msg = error_of(p)
    assert msg.startswith(f"{p}:6: duplicate key 'optimizer' (lines 3 and 6)")
    p = write(tmp_path, "data:\n  train: t\nsampler:\n  gamma: 2\n  tau: 1\n  gamma: 3\n", "n.yaml")
    assert "duplicate key 'sampler.gamma' (lines 4 and 6)" in error_of(p)
    # Keys brought in by a `<<` merge may be overridden: that is what merges are for.
    text = "data:\n  <<: {train: a, eval: e}\n  train: t\n"
    assert load_recipe(write(tmp_path, text, "m.yaml")).data.train == "t"
    msg = error_of(
        write(tmp_path, {"data": {"train": "t"}}, "o.yaml"), ["data.fields={a: x, a: y}"]
    )
    assert "duplicate key 'a'" in msg


def test_learning_rate_and_other_numbers_have_sane_bounds(tmp_path):
    msg = error_of(write(tmp_path, {"data": {"train": "t"}, "optimizer": {"lr": 1e9}}, "lr.yaml"))
    assert "optimizer.lr: Input should be less than or equal to 1; got 1000000000.0" in msg
    p = write(tmp_path, {"data": {"train": "t"}})
    assert "optimizer.eps: Input should be less than or equal to 1" in error_of(
        p, ["optimizer.eps=1.0e8"]
    )
    assert "optimizer.weight_decay: Input should be less than or equal to 1" in (
        error_of(p, ["optimizer.weight_decay=10"])
    )
    # inf / nan pass `gt=0`: epochs .inf crashed the step count, lora.alpha .inf the weights.
    msg = error_of(p, ["training.epochs=.inf", "lora.alpha=.nan"])
    assert "training.epochs: Input should be a finite number; got inf" in msg
    assert "lora.alpha: Input should be a finite number" in msg
    assert "training.seed: Input should be greater than or equal to" in error_of(
        p, [f"training.seed={-(2**70)}"]
    )
    assert load_recipe(p, ["optimizer.lr=1", "training.seed=-3"]).optimizer.lr == 1


def number_keys() -> list[str]:
    """Every dotted key whose field takes an int or a float (but not a bool)."""
    from grass_cli.recipe import Recipe
    from grass_cli.recipe.base import number_kind

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            sub = [
                a
                for a in (field.annotation, *typing.get_args(field.annotation))
                if isinstance(a, type) and issubclass(a, BaseModel)
            ]
            if sub:
                yield from walk(sub[0], f"{prefix}{name}.")
            elif number_kind(field.annotation) or name == "betas":
                yield f"{prefix}{name}"

    return list(walk(Recipe, ""))


def test_booleans_are_refused_wherever_a_number_is_expected(tmp_path):
    # bool is a subclass of int: `training.max_steps: true` validated as 1 step.
    keys = number_keys()
    assert {"training.max_steps", "optimizer.lr", "eval.max_new_tokens", "lora.r"} <= set(keys)
    base = {"data": {"train": "t"}, "sampler": {"strategy": "lora"}}
    for key in keys:
        *sections, leaf = key.split(".")
        doc = json.loads(json.dumps(base))
        node = doc
        for name in sections:  # (optimizer.offload.host_budget is three deep)
            node = node.setdefault(name, {})
        node[leaf] = True if leaf != "betas" else [True, 0.9]
        msg = error_of(write(tmp_path, doc))
        assert f"{key}: Input should be" in msg and "not a boolean" in msg, (key, msg)
    # Booleans stay booleans, and numbers given as text (quoted, or from the command
    # line) still work.
    r = load_recipe(
        write(tmp_path, {"data": {"train": "t"}, "training": {"max_steps": "3"}}),
        ["sampler.gamma=3", "sampler.train_head=true", "optimizer.lr='1e-3'"],
    )
    assert (r.training.max_steps, r.sampler.gamma, r.sampler.train_head) == (3, 3, True)
    assert r.optimizer.lr == pytest.approx(1e-3)


def test_home_is_expanded_in_path_keys(tmp_path, monkeypatch):
    # `output.dir: ~/x` made a literal ./~/x folder.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    doc = {
        "data": {"train": "~/t.jsonl", "eval": "~/e.jsonl"},
        "model": {"path": "~/m"},
        "output": {"dir": "~/runs/a"},
        "optimizer": {"offload": {"path": "~/off"}},
        "eval": {"data": "~/ev.jsonl"},
    }
    r = load_recipe(write(tmp_path, doc))
    home = tmp_path / "home"
    assert r.output.dir == str(home / "runs/a")
    assert r.optimizer.offload.path == str(home / "off")
    assert (r.data.eval, r.eval.data) == (str(home / "e.jsonl"), str(home / "ev.jsonl"))
    # Kept as written (a resume compares them verbatim); their readers expand `~`.
    assert (r.data.train, r.model.path) == ("~/t.jsonl", "~/m")
    # what `grass validate` prints (it also checks the files exist: test_preflight.py)
    assert yaml.safe_load(r.to_yaml())["output"]["dir"] == str(home / "runs/a")


def test_empty_output_dir_is_refused(tmp_path):
    # An empty dir meant the current folder, which then filled with a run's files.
    msg = error_of(write(tmp_path, {"data": {"train": "t"}, "output": {"dir": ""}}))
    assert "output.dir: Input should be a folder, not empty (write . for the current folder)" in msg
    p = write(tmp_path, {"data": {"train": "t"}}, "b.yaml")
    assert "output.dir: Input should be a folder, not empty" in error_of(p, ["output.dir="])
    assert load_recipe(p, ["output.dir=."]).output.dir == "."


def test_a_value_pyyaml_cannot_build_is_a_recipe_error(tmp_path):
    # A well-formed date that does not exist raised ValueError (a traceback).
    p = write(tmp_path, "data:\n  train: t\n  eval: 2020-13-45\n")
    assert "malformed YAML: cannot build a value: month must be in 1..12" in error_of(p)
    p = write(tmp_path, {"data": {"train": "t"}}, "b.yaml")
    assert "value is not valid YAML" in error_of(p, ["data.eval=2020-13-45"])


def test_lr_correction_only_for_grass_samplers():
    from grass_cli.errors import RecipeError
    from grass_cli.recipe import validate_dict

    def recipe(**sampler):
        d = {"model": {"path": "x"}, "data": {"train": "t.jsonl"}, "sampler": sampler}
        return validate_dict(d, "r.yaml")

    ok = recipe(strategy="grass-static", lr_correction="inverse_probability")
    assert ok.sampler.lr_correction == "inverse_probability"
    assert ok.sampler.lr_correction_clip == 4.0
    with pytest.raises(RecipeError, match="draws every block with the same probability"):
        recipe(strategy="lisa", lr_correction="inverse_probability")
    with pytest.raises(RecipeError, match="lr_correction_clip"):
        recipe(lr_correction_clip=0.5)


def test_balanced_draws_only_for_strategies_that_draw():
    from grass_cli.errors import RecipeError
    from grass_cli.recipe import validate_dict

    def recipe(strategy: str):
        d = {"model": {"path": "x"}, "data": {"train": "t.jsonl"}}
        return validate_dict({**d, "sampler": {"strategy": strategy, "draw": "balanced"}}, "r")

    assert recipe("lisa").sampler.draw == "balanced"
    assert recipe("grass-static").sampler.draw == "balanced"
    plain = {"model": {"path": "x"}, "data": {"train": "t.jsonl"}}
    assert validate_dict(plain, "r").sampler.draw == "random"
    for strategy in ("full", "cyclic", "lora"):
        with pytest.raises(RecipeError, match="sampler.draw is balanced but sampler.strategy"):
            recipe(strategy)


def test_grass_defaults_are_the_bench_recipes_studied_configuration():
    """Issue 18: the configuration the study measured (recipes/bench/grass.yaml's
    sampler) is what `strategy: grass` gets when a recipe sets nothing else."""
    from grass_cli.recipe.sections import SamplerConfig

    bench = yaml.safe_load((ROOT / "recipes/bench/grass.yaml").read_text())["sampler"]
    defaults = SamplerConfig().model_dump()
    assert {k: defaults[k] for k in bench} == bench
    assert (defaults["gamma"], defaults["tau"], defaults["probe_steps"]) == (4, 0.5, 4)
