"""From a YAML file and `key.path=value` overrides to a validated `Recipe`.

YAML is read with a loader that refuses a key given twice in one mapping (PyYAML
keeps the last one, so a second `optimizer:` section would silently replace the
first). Every validation error is gathered into one report, each line naming
its dotted key, before anything heavy is loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from grass_cli.errors import RecipeError
from grass_cli.recipe.keys import did_you_mean
from grass_cli.recipe.sections import Recipe

_MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A key given twice in one YAML mapping; `key` is its dotted path."""

    def __init__(self, key: str, first_line: int, second_line: int, mark: yaml.Mark):
        self.key = key
        self.first_line = first_line
        self.second_line = second_line
        super().__init__(problem=f"duplicate key {key!r}", problem_mark=mark)


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error.

    Keys are checked on the composed node tree, before any value is built, so the
    error can name the key's dotted path. Keys brought in by a `<<` merge are not
    duplicates: overriding them is what a merge is for.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        self._check_keys(node, "", set())
        return super().construct_document(node)

    def _check_keys(self, node: yaml.Node, prefix: str, seen: set[int]) -> None:
        if id(node) in seen:  # an alias: already checked (and may be recursive)
            return
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._check_keys(item, f"{prefix.rstrip('.')}[{i}].", seen)
            return
        if not isinstance(node, yaml.MappingNode):
            return
        first: dict[Any, int] = {}
        for key_node, value_node in node.value:
            child = prefix + "?."
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                # The constructed key, as the dict would see it: `1` and `1.0` collide.
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in first:
                    raise DuplicateKeyError(f"{prefix}{key}", first[key], line, key_node.start_mark)
                first[key] = line
                child = f"{prefix}{key}."
            self._check_keys(value_node, child, seen)


def parse_yaml(text: str) -> Any:
    """YAML text -> Python data, refusing duplicate keys (raises yaml.YAMLError).

    PyYAML raises ValueError for a few well-formed scalars it cannot build (a date
    such as 2020-13-45), and RecursionError for absurd nesting; both become a
    YAMLError here so callers have one exception to report.
    """
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except (ValueError, RecursionError) as e:
        raise yaml.YAMLError(f"cannot build a value: {e}") from None


# ---------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[str, Any]:
    """`key.path=value`, the value parsed as YAML (so 3 is an int, [a, b] a list)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(
            f"override {text!r} is not of the form key.path=value",
            hint="for example: training.max_steps=200 sampler.gamma=4",
        )
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"override {text!r}: value is not valid YAML ({e})") from None
    return key, value


# Keys of which a recipe sets one: an override of either drops the other from the file.
_ONE_OF = {"training.epochs": "training.max_steps", "training.max_steps": "training.epochs"}


def _last_word_wins(data: dict[str, Any], values: dict[str, Any]) -> None:
    """`training.epochs=2` on the command line over a file's `max_steps: 500` (or the
    reverse) replaces it, rather than being refused as setting both: the command line
    is the last word. Both overridden at once stay an error, as in a file; a null
    override sets nothing, so it drops nothing."""
    section = data.get("training")
    if not isinstance(section, dict):
        return
    for key, other in _ONE_OF.items():
        if values.get(key) is not None and other not in values:
            section.pop(other.rsplit(".", 1)[-1], None)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> set[str]:
    """Set dotted keys in the raw recipe dict; returns the keys that were overridden.

    An override of training.epochs or training.max_steps drops the other one from the
    file (`_last_word_wins`)."""
    values: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        node = data
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                prefix = ".".join(parts[: i + 1])
                raise RecipeError(
                    f"override {text!r}: {prefix} is a value, not a section",
                    hint=did_you_mean(key),
                )
            node = child
        node[parts[-1]] = value
        values[key] = value
    _last_word_wins(data, values)
    return set(values)


# ------------------------------------------------------------------------ loading


def format_error(err: dict[str, Any]) -> str:
    """One pydantic error as `dotted.key: what was wrong; got VALUE`."""
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        hint = did_you_mean(loc)
        return f"{loc}: unknown key" + (f" ({hint})" if hint else "")
    if kind == "missing":
        return f"{loc}: required key is missing"
    msg = err["msg"].removeprefix("Value error, ")
    if loc:
        given = err.get("input")
        if isinstance(given, dict):
            return f"{loc}: {msg}; got a section with keys {sorted(str(k) for k in given)}"
        return f"{loc}: {msg}; got {given!r}"
    return msg


def validate_dict(data: Any, source: str, overridden: set[str] | None = None) -> Recipe:
    """Validate a raw recipe mapping, reporting every error at once."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(
            f"the recipe must be a mapping of sections, got {type(data).__name__}",
            where=source,
            hint="start from recipes/quickstart.yaml",
        )
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            line = format_error(err)
            # A cross-field check has no loc; its message starts with the key at fault.
            loc = ".".join(str(p) for p in err["loc"]) or line.split(" ", 1)[0]
            if overridden and loc in overridden:
                line += " (from a command-line override)"
            lines.append(line)
        n = len(lines)
        head = f"invalid recipe ({n} error{'s' if n > 1 else ''}):"
        raise RecipeError(
            head + "".join(f"\n  - {line}" for line in lines),
            where=source,
            hint="`grass validate RECIPE` checks a recipe; docs/recipes.md lists every key",
        ) from None
    recipe._source = source
    return recipe


def load_yaml(path: str | Path) -> Any:
    """Read a recipe file as YAML; every failure is a RecipeError with file:line."""
    p = Path(path)
    if not p.exists():
        raise RecipeError("recipe file not found", where=str(p), hint="check the path")
    if p.is_dir():
        raise RecipeError("expected a recipe YAML file, got a folder", where=str(p))
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"cannot read recipe: {e}", where=str(p)) from None
    try:
        return parse_yaml(text)
    except DuplicateKeyError as e:
        raise RecipeError(
            f"duplicate key '{e.key}' (lines {e.first_line} and {e.second_line}): YAML "
            "would silently keep only the second",
            where=f"{p}:{e.second_line}",
            hint="keep one of them (merge the two if both hold settings you want)",
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        if mark is None:  # a value PyYAML could not build, e.g. the date 2020-13-45
            raise RecipeError(
                f"malformed YAML: {e}",
                where=str(p),
                hint="fix the value, or quote it to keep it as text",
            ) from None
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeError(
            f"malformed YAML: {problem}",
            where=f"{p}:{mark.line + 1}:{mark.column + 1}",
            hint="fix the YAML syntax at that line",
        ) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe, apply `key.path=value` overrides, validate."""
    data = load_yaml(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        return validate_dict(data, str(path))
    overridden = apply_overrides(data, overrides or [])
    return validate_dict(data, str(path), overridden)
