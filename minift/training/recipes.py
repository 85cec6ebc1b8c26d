"""Recipes: a method's settings for a task, as ``minift/recipes/<name>.toml``.

A recipe has the tables of a ``minift train --config`` file: ``[method]`` (``name`` and the
method's options), ``[train]`` and ``[data]``; ``minift compare`` also reads a ``[compare]``
table where a recipe has one: its ``lr`` replaces ``[train]``'s and its other keys replace
``[method]`` options in ``minift compare``, and a ``[compare.full]`` table's keys replace those
under ``compare --full`` (``compare_settings``). ``minift train --recipe NAME`` and ``minift
compare`` both read them here.
"""
from __future__ import annotations

import tomllib
from pathlib import Path

RECIPES_DIR = Path(__file__).parents[1] / "recipes"


def available_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.toml"))


def recipe_path(name: str) -> Path:
    return RECIPES_DIR / f"{name}.toml"


def load_recipe(name: str) -> dict:
    """The recipe ``minift/recipes/<name>.toml`` as a dict with ``method``, ``train`` and
    ``data`` tables.

    Raises:
        ValueError: an unknown name (the message lists the recipes there are), or a recipe
            without a ``[method]`` or ``[train]`` table.
    """
    path = recipe_path(name)
    if not path.is_file() or "/" in name or "\\" in name:
        raise ValueError(f"unknown recipe {name!r}; available: {', '.join(available_recipes())}")
    with open(path, "rb") as f:
        recipe = tomllib.load(f)
    for table in ("method", "train"):
        if not isinstance(recipe.get(table), dict):
            raise ValueError(f"recipe {name!r} ({path}) has no [{table}] table")
    return recipe


def recipe_options(recipe: dict) -> dict:
    """The ``[method]`` options of a recipe as ``parse_method`` / ``build_method`` take them:
    every key but ``name``."""
    return {k: v for k, v in recipe["method"].items() if k != "name"}


def compare_settings(recipe: dict, full: bool = False) -> tuple[float | None, dict]:
    """The peak lr and the method options ``minift compare`` trains a recipe's method with: the
    ``[compare]`` table's ``lr`` (else ``[train]``'s) and the ``[method]`` options with
    ``[compare]``'s other keys laid over them; with ``full`` (``compare --full``) the
    ``[compare.full]`` table's keys are laid over those.

    Args:
        recipe: a recipe as ``load_recipe`` returns it.
        full: ``compare --full``'s settings (the ``[compare.full]`` table applies).
    Returns:
        (lr, options): the lr is None for a recipe that trains no gradient step (probe); the
        options as ``parse_method`` / ``build_method`` take them.
    """
    compare = dict(recipe.get("compare", {}))
    compare.update(compare.pop("full", {}) if full else {})
    compare.pop("full", None)
    lr = compare.pop("lr", recipe["train"].get("lr"))
    return lr, {**recipe_options(recipe), **compare}
