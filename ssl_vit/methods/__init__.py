"""Pretext objectives over the shared backbone; `OBJECTIVES` maps a config name to its class."""

from __future__ import annotations

import inspect
from typing import Any

from timm.models.vision_transformer import VisionTransformer

from ssl_vit.methods.base import Objective
from ssl_vit.methods.dino.model import DINO
from ssl_vit.methods.dinov2.model import DINOv2
from ssl_vit.methods.mae.model import MAE

OBJECTIVES: dict[str, type[Objective]] = {"mae": MAE, "dino": DINO, "dinov2": DINOv2}


def build_objective(name: str, method_cfg: Any, backbone: VisionTransformer,
                    total_steps: int | None = None, device_aug: bool = False, compile: bool = False) -> Objective:
    """`method_cfg`: the objective's config section (`cfg.mae`); `total_steps` reaches objectives that take it
    (DINO's and DINOv2's momentum); `device_aug`, `compile`: `data.device_aug`, `train.compile`."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; choose from {sorted(OBJECTIVES)}")
    cls = OBJECTIVES[name]
    kwargs: dict[str, Any] = {"device_aug": True} if device_aug else {}
    if total_steps is not None and "total_steps" in inspect.signature(cls).parameters:
        kwargs["total_steps"] = total_steps
    objective = cls(method_cfg, backbone, **kwargs)
    if compile:
        objective.compile_encoder()
    return objective


__all__ = ["OBJECTIVES", "Objective", "build_objective"]
