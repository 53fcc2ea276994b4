"""Recipes: where the shipped ones live, a recipe given by path or bare name, and which schema (pretraining or
fine-tuning) a recipe and its overrides belong to."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DEMO_RECIPE = "mae_demo_tiny.yaml"


def _recipes_dir() -> Path:
    """recipes/ of a source checkout (editable install), else the copy a wheel installs under
    <prefix>/share/ssl_vit/recipes (pyproject's data-files)."""
    checkout = Path(__file__).resolve().parents[2] / "recipes"
    return checkout if checkout.is_dir() else Path(sys.prefix) / "share" / "ssl_vit" / "recipes"


RECIPES_DIR = _recipes_dir()


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
    """("pretrain" | "finetune", config) of a recipe with its overrides, loaded by the schema their keys belong
    to (`recipe_kind`); its errors are then that schema's (a misspelled key is named against the right keys)."""
    from ssl_vit.config.finetune import load_finetune_config
    from ssl_vit.config.pretrain import load_config

    path = recipe_path(recipe)
    if recipe_kind(path, overrides) == "finetune":
        return "finetune", load_finetune_config(path, overrides)
    return "pretrain", load_config(path, overrides)


def recipe_kind(path: Path, overrides: Sequence[str] = ()) -> str:
    """"finetune" when more of the keys in the recipe and the overrides exist only in the fine-tuning schema
    (data.val, model.backbone, augment.*) than only in the pretraining one (objective, mae.*, train.total_steps),
    else "pretrain". Misspelled keys are in neither, so they do not sway it."""
    return "finetune" if finetune_votes(path, overrides) > 0 else "pretrain"


def finetune_votes(path: Path, overrides: Sequence[str]) -> int:
    """Keys only the fine-tuning schema has minus keys only the pretraining one has (see `recipe_kind`)."""
    import yaml

    from ssl_vit.config.finetune import FinetuneConfig
    from ssl_vit.config.pretrain import Config
    from ssl_vit.config.schema import field_types

    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # not readable: load_config says why
        data = None
    keys = [o.split("=", 1)[0].strip() for o in overrides] + _leaf_keys(data)
    finetune, pretrain = set(field_types(FinetuneConfig)), set(field_types(Config))
    return sum(k in finetune - pretrain for k in keys) - sum(k in pretrain - finetune for k in keys)


def _leaf_keys(data: Any, prefix: str = "") -> list[str]:
    if not isinstance(data, dict):
        return [prefix[:-1]] if prefix else []
    return [key for name, value in data.items() for key in _leaf_keys(value, f"{prefix}{name}.")]
