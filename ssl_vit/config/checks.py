"""Value checks shared by the pretraining and fine-tuning configs: finite numbers, ranges written as the
intervals the errors show, crop-scale pairs, a non-empty run dir, and what only timm can tell (a ViT's own
width and heads, whether it parses an augmentation policy).

Each check raises a one-line `ConfigError` naming the key, so a bad value fails when the config is loaded
(`ssl-vit config` included), not as a traceback, a NaN loss or a silently wrong run later.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
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
}
SHARED_NOTES = {"optim.lr": "or null: base_lr × global batch / 256", "optim.clip_grad": "or null: no clipping",
                "data.num_workers": "0: load in the training process", "train.keep_last": "0: keep all"}


def lookup(cfg: Any, key: str) -> Any:
    """The value of a dotted key (`optim.lr`) in a config dataclass."""
    for name in key.split("."):
        cfg = getattr(cfg, name)
    return cfg


def in_interval(value: float, interval: str) -> bool:
    """Whether `value` lies in an interval written as "[0, 1)", "(0, inf)" and so on."""
    lo, hi = map(float, interval[1:-1].split(","))  # float() reads " inf"
    above = value > lo if interval[0] == "(" else value >= lo
    below = value < hi if interval[-1] == ")" else value <= hi
    return above and below


def describe_interval(interval: str) -> str:
    """ "must be in [0, 1)", or for a half-line "must be at least 1" / "must be greater than 0"."""
    low, high = (part.strip() for part in interval[1:-1].split(","))
    if high == "inf":
        return f"must be {'at least' if interval[0] == '[' else 'greater than'} {low}"
    return f"must be in {interval}"


def check_values(cfg: Any, choices: Mapping[str, tuple[Any, ...]], ranges: Mapping[str, str],
                 notes: Mapping[str, str]) -> None:
    """Each key's value one of its `choices`; no float NaN or inf (no key means anything by them: null says "off"
    or "auto" where a key has such a setting); each number, or every element of a list, in its interval from
    `ranges`, where null passes, as it means the key's own default behaviour. `notes` adds what null or 0 means
    to the message, as the user may want that instead."""
    for key, allowed in choices.items():
        if lookup(cfg, key) not in allowed:
            names = ", ".join("null" if a is None else repr(a) for a in allowed)
            raise ConfigError(f"{key}: {lookup(cfg, key)!r} is not one of [{names}]")
    def elements(value: Any) -> tuple[Any, ...]:
        return value if isinstance(value, tuple) else (value,)

    def shown(value: Any) -> Any:  # a list is shown whole, as it was written
        return list(value) if isinstance(value, tuple) else value

    for key in field_types(type(cfg)):
        if any(isinstance(v, float) and not math.isfinite(v) for v in elements(lookup(cfg, key))):
            raise ConfigError(f"{key}: must be a finite number, got {shown(lookup(cfg, key))}")
    for key, interval in ranges.items():
        value = lookup(cfg, key)
        if value is not None and not all(in_interval(v, interval) for v in elements(value)):
            each = "each " if isinstance(value, tuple) else ""
            note = f" ({notes[key]})" if key in notes else ""
            raise ConfigError(f"{key}: {each}{describe_interval(interval)}{note}, got {shown(value)}")


def check_scale(key: str, scale: tuple[float, float]) -> None:
    """A RandomResizedCrop area range: a share of the image, low end first (torchvision takes a reversed or
    empty range without a word and crops something else)."""
    low, high = scale
    if not 0.0 < low <= high <= 1.0:
        raise ConfigError(f"{key}: must be [min, max] with 0 < min <= max <= 1, got {list(scale)}")


def check_run_dir(run_dir: str) -> None:
    """An empty run dir is the current directory: checkpoints, logs and exports would land among the user's
    own files, and a later run would resume from them."""
    if not run_dir.strip():
        raise ConfigError("train.run_dir: must not be empty (it would write the run into the current directory)")


def check_divides(heads_key: str, heads: int, dim_key: str, dim: int) -> None:
    """Attention splits the width evenly across heads (timm asserts it when the model is built)."""
    if dim % heads:
        raise ConfigError(f"{heads_key}: {heads} heads do not divide {dim_key} {dim} evenly")


def timm_width_and_heads(name: str) -> tuple[int, int] | None:
    """(embed_dim, num_heads) of the timm ViT `name` as timm builds it by default, or None where timm cannot
    build it (the build reports why). Parameters land on the meta device (no memory, no init); only called when
    one of model.embed_dim / model.num_heads is null and the other is set, as it imports timm."""
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
    """Parse the policy with timm's own transform factory, the one fine-tuning calls: timm's policy grammar
    changes between versions, so asking it is the only list that is never wrong. Fails at config time with the
    key named instead of timm's bare AssertionError when the first epoch starts."""
    if not policy:
        return
    from timm.data import create_transform

    try:
        create_transform(input_size=32, is_training=True, auto_augment=policy)
    except (AssertionError, ValueError, KeyError, IndexError) as err:
        why = f" ({str(err).strip()})" if str(err).strip() else ""
        raise ConfigError(f"augment.auto_augment: timm does not accept {policy!r}{why}; give a timm policy such "
                          "as 'rand-m9-mstd0.5-inc1', or '' for none") from None
