"""Refuse a resume whose model differs from the checkpoint's: by tensor shapes, or by the config keys that change
a model while keeping every shape (heads, the DINO head's weight norm), before anything is loaded or written."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ssl_vit.config.schema import ConfigError
from ssl_vit.training.checkpoint import model_mismatch

if TYPE_CHECKING:
    from ssl_vit.config.pretrain import Config
    from ssl_vit.methods import Objective


def check_resume_model(objective: Objective, cfg: Config, path: Path, sharded: bool = False) -> None:
    """Refuse, in one line, to resume from the checkpoint at `path` with a model of another architecture (the
    run dir reused with a new model.depth or model.num_heads), naming what differs from the run's config.yaml,
    before anything is loaded or written. `sharded` (FSDP) checkpoints have no tensor shapes to read: Accelerate
    checks those when loading, and only the config is compared here."""
    from ssl_vit.config.pretrain import load_config
    from ssl_vit.config.schema import differences

    try:
        saved: Config | None = load_config(Path(cfg.train.run_dir) / "config.yaml")
    except (ConfigError, OSError):
        saved = None
    shapes = None if sharded else model_mismatch(objective, path)
    if shapes is not None:  # name the keys that changed since the run's config.yaml, when it can be read
        changed = [] if saved is None else differences(saved, cfg, ("objective", "model.", f"{cfg.objective}."))
        why = (f"{', '.join(changed)} since the run's config.yaml; " if changed else "") + shapes
    elif saved is not None and (same_shapes := shapeless_changes(saved, cfg)):
        why = f"{', '.join(same_shapes)} since the run's config.yaml"
    else:
        return
    raise ValueError(f"checkpoint {path} was made with a different model config ({why}); resume with the run's "
                     "own config, or set a new train.run_dir")


# Config keys that change a model without changing any tensor's shape, which `model_mismatch` therefore cannot
# see (objective: where the key applies). A checkpoint loads into such a model, and its training breaks.
_SHAPELESS = {"model.name": None, "model.num_heads": None, "mae.decoder_heads": "mae", "dino.norm_last_layer": "dino"}


def shapeless_changes(saved: Config, cfg: Config) -> list[str]:
    """`key old → new` for each of those keys in which `cfg` differs from a run's `saved` config (heads
    compared as built: model.num_heads null is the timm model's own number)."""
    changed = []
    for key, objective in _SHAPELESS.items():
        section, name = key.split(".")
        old, new = getattr(getattr(saved, section), name), getattr(getattr(cfg, section), name)
        if objective not in (None, cfg.objective) or old == new:
            continue
        if key == "model.num_heads" and _heads(saved) == _heads(cfg):
            continue
        changed.append(f"{key} {old} → {new}")
    return changed


def _heads(cfg: Config) -> list[int]:
    from ssl_vit.models.backbone import build_backbone

    try:
        with torch.device("meta"):  # the structure without allocating or initialising any weight
            vit = build_backbone(cfg.model)
    except ValueError:  # older timm (1.0.16 at least) calls .item() while building, which meta tensors refuse
        vit = build_backbone(cfg.model)
    return [block.attn.num_heads for block in vit.blocks]


def process_count_notice(cfg: Config, checkpoint: Path, processes: int) -> str | None:
    """A line when a resume runs on fewer processes than the checkpoint was saved by (more are refused): the
    global batch shrinks, and with `optim.base_lr` the learning rate with it. The process count is no config
    key, so `run_dir.keep_changed_config` cannot name it."""
    saved = len(list(checkpoint.glob("random_states_*.pkl")))
    if saved in (0, processes):
        return None
    batch = cfg.data.batch_size * cfg.optim.accum_steps
    lr = "" if cfg.optim.lr is not None else ", and the peak lr (optim.base_lr × global batch / 256) with it"
    return (f"note: {checkpoint.name} was saved by {saved} processes, this run has {processes}: global batch "
            f"{batch * saved} → {batch * processes}{lr}; raise optim.accum_steps to keep them")
