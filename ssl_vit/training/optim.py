"""The optimizer and its schedules: pure functions of the optimizer step (a stream has no epochs; resume no state)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ssl_vit.config.pretrain import Config

if TYPE_CHECKING:
    from ssl_vit.config.finetune import FinetuneConfig
    from ssl_vit.methods import Objective


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from `start` at step 0 to `end` at `total_steps` (held at `end` afterwards)."""
    if total_steps <= 0:
        return end
    progress = min(max(step / total_steps, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float, final: float = 0.0) -> float:
    """Linear warmup from 0 to `peak` over `warmup_steps`, then cosine decay to `final` at `total_steps`."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, final)


def peak_lr(cfg: Config | FinetuneConfig, num_processes: int) -> float:
    """The linear scaling rule: lr = base_lr × global batch / 256, unless an absolute lr is given."""
    if cfg.optim.lr is not None:
        return cfg.optim.lr
    return cfg.optim.base_lr * cfg.data.batch_size * num_processes * cfg.optim.accum_steps / 256


def build_optimizer(objective: Objective, cfg: Config | FinetuneConfig, use_fused: bool) -> torch.optim.AdamW:
    """AdamW over the objective's parameter groups (`apply_wd`, and `lr_scale` where it has layer decay); in
    pretraining the backbone's `optim.backbone_lr_scale` and `optim.layer_decay` (docs/adapt.md)."""
    if isinstance(cfg, Config):  # not fine-tuning's Classify, which brings its own layer decay
        o = cfg.optim
        groups = objective.param_groups(o.weight_decay, o.backbone_lr_scale, o.layer_decay)
    else:
        groups = objective.param_groups(cfg.optim.weight_decay)
    # lr is set from the schedule before every step; the value here is a placeholder.
    return torch.optim.AdamW(groups, lr=0.0, betas=cfg.optim.betas, fused=use_fused or None)
