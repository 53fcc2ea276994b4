"""Pretext objectives over the shared backbone; `OBJECTIVES` maps a config name to its class."""

from __future__ import annotations

import inspect
from typing import Any

from timm.models.vision_transformer import VisionTransformer

from ssl_vit.methods.base import Objective
from ssl_vit.methods.dino.model import DINO
from ssl_vit.methods.mae.model import MAE

OBJECTIVES: dict[str, type[Objective]] = {"mae": MAE, "dino": DINO}


def build_objective(name: str, method_cfg: Any, backbone: VisionTransformer,
                    total_steps: int | None = None, device_aug: bool = False, compile: bool = False) -> Objective:
    """`method_cfg` is the objective's own config section (e.g. `cfg.mae`); `total_steps` (the run's optimizer
    steps) reaches the objectives whose own schedules need it (DINO's teacher momentum); `device_aug` moves
    the objective's augmentation from the loader to the start of its `forward` (`data.device_aug`); `compile`
    runs its encoder calls through torch.compile (`train.compile`)."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose from {sorted(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    kwargs = {}
    if total_steps is not None and "total_steps" in inspect.signature(cls).parameters:
        kwargs["total_steps"] = total_steps
    if device_aug:
        kwargs["device_aug"] = True
    objective = cls(method_cfg, backbone, **kwargs)
    if compile:
        objective.compile_encoder()
    return objective


__all__ = ["OBJECTIVES", "Objective", "build_objective"]
