"""Property test: the recipe loader answers any YAML with a Recipe or a RecipeError.

Random documents and mutations of the shipped recipes (keys renamed, values
replaced by other types, sections dropped, lines cut, keys duplicated) must never
produce a traceback: only a validated recipe or one clear RecipeError. A recipe
that validates holds no boolean where a number belongs, no inf/nan, and no
unexpanded `~` or empty output.dir.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grass_cli.errors import RecipeError
from grass_cli.recipe import Recipe, Section, load_recipe
from grass_cli.recipe.base import number_kind

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "recipes").rglob("*.yaml"))]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.text(max_size=12), children, max_size=4),
    ),
    max_leaves=12,
)


# Override values that are valid YAML but were trouble: booleans and inf/nan for
# numbers, a date PyYAML cannot build, a duplicate key, `~`, an empty value.
TRICKY_VALUES = [
    "true",
    "false",
    ".inf",
    "-.inf",
    ".nan",
    "2020-13-45",
    "{a: 1, a: 2}",
    "~/x",
    "",
    "1e9",
    "1.0e9",
    "'3'",
    "-1",
]


def check(tmp: Path, text: str, overrides: list[str] | None = None) -> None:
    path = tmp / "r.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        recipe = load_recipe(path, overrides)
    except RecipeError as e:
        assert str(e).strip()
        return
    assert isinstance(recipe, Recipe)
    assert_sane(recipe)


def assert_sane(section: Section) -> None:
    """What validation promises about every value of a recipe it accepts."""
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if isinstance(value, Section):
            assert_sane(value)
            continue
        items = value if isinstance(value, tuple) else [value]
        for v in items:
            if number_kind(field.annotation) or name == "betas":
                assert not isinstance(v, bool), (name, value)
            if isinstance(v, float):
                assert math.isfinite(v), (name, value)
    if hasattr(section, "dir"):
        assert section.dir.strip() and not section.dir.startswith("~")


def paths(d, prefix=()):
    if isinstance(d, dict):
        for k, v in d.items():
            yield prefix + (k,)
            yield from paths(v, prefix + (k,))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(doc=values)
def test_random_documents(tmp_path, doc):
    check(tmp_path, yaml.safe_dump(doc))


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=200))
def test_random_text(tmp_path, text):
    check(tmp_path, text)


@settings(
    max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_mutated_shipped_recipes(tmp_path, data):
    import copy

    doc = copy.deepcopy(data.draw(st.sampled_from(SHIPPED)))
    for _ in range(data.draw(st.integers(1, 3))):
        keys = list(paths(doc))
        if not keys:
            break
        path = data.draw(st.sampled_from(keys))
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        action = data.draw(st.sampled_from(["replace", "rename", "delete"]))
        if action == "replace":
            parent[path[-1]] = data.draw(values)
        elif action == "rename":
            parent[path[-1] + data.draw(st.text(min_size=1, max_size=3))] = parent.pop(path[-1])
        else:
            del parent[path[-1]]
    text = yaml.safe_dump(doc)
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(0, len(text)))
        text = text[:cut]
    overrides = data.draw(
        st.lists(
            st.builds(
                lambda k, v: f"{k}={v}",
                st.sampled_from(
                    [
                        "sampler.gamma",
                        "training.max_steps",
                        "optimizer.lr",
                        "model",
                        "x.y.z",
                        "data",
                        "output.dir",
                        "optimizer.offload.path",
                        "sampler.eps",
                        "eval.max_new_tokens",
                    ]
                ),
                st.one_of(st.text(max_size=10), st.sampled_from(TRICKY_VALUES)),
            ),
            max_size=2,
        )
    )
    check(tmp_path, text, overrides)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_duplicated_keys_are_named(tmp_path, data):
    doc = data.draw(
        st.sampled_from([d for d in SHIPPED if any(isinstance(v, dict) and v for v in d.values())])
    )
    section = data.draw(st.sampled_from([k for k, v in doc.items() if isinstance(v, dict) and v]))
    lines = yaml.safe_dump(doc, sort_keys=False).splitlines()
    if data.draw(st.booleans()):
        # The whole section again at the end: `section:` twice at the top level.
        text = "\n".join(lines) + f"\n{section}:\n  x: 1\n"
        expect = f"duplicate key '{section}'"
    else:
        # One of its keys again, right under the section's header line.
        key = data.draw(st.sampled_from(list(doc[section])))
        at = lines.index(f"{section}:") + 1
        text = "\n".join(lines[:at] + [f"  {key}: 1"] + lines[at:]) + "\n"
        expect = f"duplicate key '{section}.{key}'"
    path = tmp_path / "r.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        load_recipe(path)
    except RecipeError as e:
        assert expect in str(e) and "(lines " in str(e), str(e)
    else:
        raise AssertionError(f"{expect} was accepted")
