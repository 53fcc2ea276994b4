"""Recipes: where the shipped ones live, a recipe given by path or bare name, and which schema (pretraining or
fine-tuning) a recipe and its overrides belong to."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEMO_RECIPE = "mae_demo_tiny.yaml"
# recipes/ of a source checkout (editable install), else the copy a wheel installs (pyproject's data-files)
RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"
if not RECIPES_DIR.is_dir():
    RECIPES_DIR = Path(sys.prefix) / "share" / "ssl_vit" / "recipes"


def recipe_path(recipe: str | None, default: str = DEMO_RECIPE) -> Path:
    """A recipe path, a bare name from recipes/ (`mae_vit_base_p16`), or the built-in demo when None."""
    if recipe is None:
        return RECIPES_DIR / default
    path = Path(recipe)
    if path.is_file():
        return path
    for candidate in (RECIPES_DIR / recipe, RECIPES_DIR / f"{recipe}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
    close = difflib.get_close_matches(path.name.removesuffix(".yaml"), known, n=1, cutoff=0.6)
    if close:  # a mistyped recipe name: name the shipped one it most likely means
        from ssl_vit.config.schema import ConfigError

        raise ConfigError(f"recipe not found: {recipe}; did you mean {close[0]!r}?")
    return path  # load_config reports it as not found


def load_any_config(recipe: str | None, overrides: Sequence[str]) -> tuple[str, Any]:
    """("pretrain" | "finetune", config) of a recipe with its overrides, loaded by the schema more of their keys
    belong to (`finetune_votes`), whose errors then name a misspelled key against the right keys."""
    from ssl_vit.config.finetune import load_finetune_config
    from ssl_vit.config.pretrain import load_config

    path = recipe_path(recipe)
    if finetune_votes(path, overrides) > 0:
        return "finetune", load_finetune_config(path, overrides)
    return "pretrain", load_config(path, overrides)


def finetune_votes(path: Path, overrides: Sequence[str]) -> int:
    """Keys of the recipe and the overrides that only the fine-tuning schema has (data.val, augment.*) minus those
    only the pretraining one has (objective, mae.*); misspelled keys are in neither, so they do not sway it."""
    from ssl_vit.config.finetune import FinetuneConfig
    from ssl_vit.config.pretrain import Config
    from ssl_vit.config.schema import field_types, leaf_keys, read_recipe

    keys = [o.split("=", 1)[0].strip() for o in overrides] + leaf_keys(read_recipe(path))  # or the load's own error
    finetune, pretrain = set(field_types(FinetuneConfig)), set(field_types(Config))
    return sum(k in finetune - pretrain for k in keys) - sum(k in pretrain - finetune for k in keys)

