"""Value checks shared by the pretraining and fine-tuning configs, each a one-line `ConfigError` naming the key,
raised when the config is loaded (docs/config.md, "How a config is checked")."""

from __future__ import annotations

import math
from collections.abc import Mapping
from operator import attrgetter
from typing import Any

from ssl_vit.config.schema import ConfigError, field_types

# The keys pretraining and fine-tuning share, with their intervals and what null means there.
SHARED_RANGES = {
    "optim.base_lr": "(0, inf)", "optim.lr": "(0, inf)", "optim.min_lr": "[0, inf)",
    "optim.weight_decay": "[0, inf)", "optim.betas": "[0, 1)",
    "optim.clip_grad": "(0, inf)",  # max norm 0 zeroes every gradient; a negative one flips them
    "optim.accum_steps": "[1, inf)", "data.batch_size": "[1, inf)", "data.num_workers": "[0, inf)",
    "data.shuffle_buffer": "[0, inf)", "train.keep_last": "[0, inf)", "train.max_nonfinite_steps": "[1, inf)",
    "train.log_every": "[1, inf)",  # not 0 for never: it divided by zero
    "train.seed": "[0, 4294967295]",  # numpy's seed range: set_seed refused anything else once training began
}
SHARED_NOTES = {"optim.lr": "or null: base_lr × global batch / 256", "optim.clip_grad": "or null: no clipping",
                "data.num_workers": "0: load in the training process", "train.keep_last": "0: keep all"}


def in_interval(value: float, interval: str) -> bool:
    """Whether `value` lies in an interval written as "[0, 1)", "(0, inf)" and so on."""
    lo, hi = map(float, interval[1:-1].split(","))  # float() reads " inf"
    return (value > lo if interval[0] == "(" else value >= lo) and (value < hi if interval[-1] == ")" else value <= hi)


def check_values(cfg: Any, choices: Mapping[str, tuple[Any, ...]], ranges: Mapping[str, str],
                 notes: Mapping[str, str], scales: tuple[str, ...]) -> None:
    """Choices; no NaN or inf anywhere; each number (every element of a list) in its interval, null passing (it is
    the key's own default), with `notes` saying what null or 0 means; crop area ranges; a non-empty run dir."""
    for key, allowed in choices.items():
        if attrgetter(key)(cfg) not in allowed:
            names = ", ".join("null" if a is None else repr(a) for a in allowed)
            raise ConfigError(f"{key}: {attrgetter(key)(cfg)!r} is not one of [{names}]")
    for key in field_types(type(cfg)):
        value = attrgetter(key)(cfg)
        items, shown = (value, list(value)) if isinstance(value, tuple) else ((value,), value)  # a list shown whole
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            raise ConfigError(f"{key}: must be a finite number, got {shown}")
    for key, interval in ranges.items():  # a key that is no field fails here, whatever its value
        value = attrgetter(key)(cfg)
        items, shown = (value, list(value)) if isinstance(value, tuple) else ((value,), value)
        if value is not None and not all(in_interval(v, interval) for v in items):
            low, high = (part.strip() for part in interval[1:-1].split(","))
            bound = (f"must be {'at least' if interval[0] == '[' else 'greater than'} {low}" if high == "inf"
                     else f"must be in {interval}")
            note = f" ({notes[key]})" if key in notes else ""
            raise ConfigError(f"{key}: {'each ' if isinstance(value, tuple) else ''}{bound}{note}, got {shown}")
    for key in scales:  # RandomResizedCrop area ranges: torchvision crops something else from a reversed one
        low, high = attrgetter(key)(cfg)
        if not 0.0 < low <= high <= 1.0:
            raise ConfigError(f"{key}: must be [min, max] with 0 < min <= max <= 1, got {[low, high]}")
    if not cfg.train.run_dir.strip():  # the current directory: the run would land among the user's own files
        raise ConfigError("train.run_dir: must not be empty (it would write the run into the current directory)")


def timm_width_and_heads(name: str) -> tuple[int, int] | None:
    """(embed_dim, num_heads) of the timm ViT `name` as timm builds it by default, or None where timm cannot build
    it (the build says why). Imports timm: only called when one of model.embed_dim / model.num_heads is null."""
    import timm
    from accelerate import init_empty_weights

    try:
        # not `with torch.device("meta")`: timm 1.0.16-1.0.20 read their drop-path rates with .item() while building
        with init_empty_weights():
            vit = timm.create_model(name, pretrained=False, num_classes=0)
        return int(vit.embed_dim), int(vit.blocks[0].attn.num_heads)
    except (RuntimeError, AttributeError, IndexError, TypeError):  # unknown name, or not a plain ViT
        return None


def check_auto_augment(policy: str) -> None:
    """Parse the policy with timm's own transform factory, the one fine-tuning calls (its grammar changes between
    versions): named by key now, instead of timm's bare AssertionError when the first epoch starts."""
    if not policy:
        return
    from timm.data import create_transform

    try:
        create_transform(input_size=32, is_training=True, auto_augment=policy)
    except (AssertionError, ValueError, KeyError, IndexError) as err:
        why = f" ({str(err).strip()})" if str(err).strip() else ""
        raise ConfigError(f"augment.auto_augment: timm does not accept {policy!r}{why}; give a timm policy such "
                          "as 'rand-m9-mstd0.5-inc1', or '' for none") from None
