"""Property test: the recipe loader answers any YAML with a Recipe or a RecipeError.

Random documents and mutations of the shipped recipes (keys renamed, values
replaced by other types, sections dropped, lines cut) must never produce a
traceback: only a validated recipe or one clear RecipeError.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from grass_cli.errors import RecipeError
from grass_cli.recipe import Recipe, load_recipe

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


def check(tmp: Path, text: str, overrides: list[str] | None = None) -> None:
    path = tmp / "r.yaml"
    path.write_text(text, encoding="utf-8")
    try:
        recipe = load_recipe(path, overrides)
    except RecipeError as e:
        assert str(e).strip()
        return
    assert isinstance(recipe, Recipe)


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
                    ]
                ),
                st.text(max_size=10),
            ),
            max_size=2,
        )
    )
    check(tmp_path, text, overrides)
