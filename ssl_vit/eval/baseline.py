"""The backbone an evaluation runs on: the exported weights, or the same architecture at a seeded random init
(seeded so the baseline is one number, not noise: docs/evaluation.md)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

RANDOM_INIT_SEED = 0  # the documented default of every --random-init baseline


def load_eval_backbone(path: str | Path, random_init: bool = False,
                       seed: int = RANDOM_INIT_SEED) -> tuple[VisionTransformer, dict[str, Any]]:
    """`checkpoint.load_backbone`, with a random init drawn from `seed` (the same weights on every call)."""
    import torch  # here, not above: the command line imports this module for its default seed, before any work

    from ssl_vit.training.checkpoint import load_backbone

    if not random_init:
        return load_backbone(path)
    with torch.random.fork_rng(devices=[]):  # CPU generator only: model init draws on the CPU
        torch.manual_seed(seed)
        return load_backbone(path, random_init=True)
