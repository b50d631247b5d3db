"""Help for every config key, read from the schema's own comments, and built-in recipes by name.

`kdistill config RECIPE` prints the resolved config with each key's help beside it; the help is
the comment on (or just above) the key's line in schema.py, so there is one text to keep true.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import inspect
import io
import tokenize
import typing
from importlib import resources
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from kdistill.config import schema
from kdistill.errors import KdistillError


@functools.cache
def _comments_by_line() -> dict[int, tuple[str, bool]]:
    """Line number -> (comment text, whether the line holds nothing but the comment), in schema.py."""
    source = inspect.getsource(schema)
    comments = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            alone = token.line.strip().startswith("#")
            comments[token.start[0]] = (token.string.lstrip("#").strip(), alone)
    return comments


def _field_help(cls: type) -> dict[str, str]:
    """Field -> help for one schema dataclass: its trailing comment, else the comment lines above it."""
    comments = _comments_by_line()
    lines, first = inspect.getsourcelines(cls)
    helps = {}
    for offset, line in enumerate(lines):
        number = first + offset
        name = line.strip().split(":", 1)[0]
        if not name.isidentifier() or name not in {f.name for f in dataclasses.fields(cls)}:
            continue
        trailing = comments.get(number)
        if trailing and not trailing[1]:
            helps[name] = trailing[0]
            continue
        above = []
        while (comment := comments.get(number - 1 - len(above))) and comment[1]:
            above.insert(0, comment[0])
        if above:
            helps[name] = " ".join(above)
    return helps


@functools.cache
def key_help() -> dict[str, str]:
    """Dotted key -> one line of help, for every key of the schema."""
    found: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        helps = {}
        for base in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):  # a subclass's comment wins
            helps.update(_field_help(base))
        for field in dataclasses.fields(cls):
            key = f"{prefix}{field.name}"
            if field.name in helps:
                found[key] = helps[field.name]
            if dataclasses.is_dataclass(hints[field.name]):
                walk(hints[field.name], f"{key}.")
    walk(schema.RunConfig, "")
    return found


def annotated_yaml(cfg: DictConfig) -> str:
    """The config as YAML, each key's help as a comment at the end of its line (still valid YAML)."""
    helps = key_help()
    lines = OmegaConf.to_yaml(cfg, resolve=True).splitlines()
    path: list[str] = []
    annotated = []
    for number, line in enumerate(lines):
        stripped = line.lstrip(" ")
        indent = (len(line) - len(stripped)) // 2
        if stripped.startswith("- ") or ":" not in stripped:
            annotated.append((line, None))  # a list item, or the rest of a long value
            continue
        path = path[:indent] + [stripped.split(":", 1)[0]]
        after = lines[number + 1] if number + 1 < len(lines) else ""
        # YAML folds a long value onto the lines below (deeper than its key): a comment would cut it.
        folded = not line.endswith(":") and len(after) - len(after.lstrip(" ")) > len(line) - len(stripped)
        annotated.append((line, None if folded else helps.get(".".join(path))))
    width = min(56, max(len(line) for line, _ in annotated))
    return "\n".join(f"{line:<{width}}  # {text}" if text else line for line, text in annotated) + "\n"


# -- built-in recipes -----------------------------------------------------------------------------

def builtin_recipes() -> dict[str, Path]:
    """Name -> path of the recipes shipped inside the package (kdistill/recipes/*.yaml)."""
    folder = resources.files("kdistill") / "recipes"
    return {Path(entry.name).stem: Path(str(entry)) for entry in sorted(folder.iterdir(), key=lambda e: e.name)
            if entry.name.endswith(".yaml")}


def recipe_summary(path: Path) -> str:
    """The first comment line of a recipe: what it is (without the punctuation that leads to its second line)."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip().rstrip(",:;")
    return ""


def find_recipe(recipe: str | Path) -> Path:
    """A recipe file as given, or, for a bare name that is not a file, the built-in recipe of that name."""
    path = Path(recipe)
    is_name = "/" not in str(recipe) and path.suffix not in (".yaml", ".yml")
    if path.exists() or not is_name:
        return path
    recipes = builtin_recipes()
    if str(recipe) in recipes:
        return recipes[str(recipe)]
    close = difflib.get_close_matches(str(recipe), recipes, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise KdistillError(f"recipe {str(recipe)!r} is neither a file nor a built-in recipe; {hint}built-in recipes: "
                        f"{', '.join(recipes)} (or give the path of a YAML file)")


def flatten(tree, prefix: str = "") -> dict:
    """A nested config as {"train.lr": 0.01, ...}: the dotted keys a user writes."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat
