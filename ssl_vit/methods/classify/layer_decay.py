"""Layer-wise lr decay as MAE's `util/lr_decay.py` assigns it: layer id n of L + 2 (stem 0, block i → i + 1, the
rest L + 1) gets lr × decay^(L + 1 − n). Not timm's `param_groups_layer_decay`: docs/design.md says why."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from timm.models.vision_transformer import VisionTransformer

# Before the first block; timm's pre-norm and register tokens (not in MAE's models) take the stem's id too.
_STEM = ("cls_token", "pos_embed", "reg_token", "dist_token", "patch_embed.", "norm_pre.")


def layer_id(name: str, num_blocks: int) -> int:
    """MAE's `get_layer_id_for_vit` for a timm ViT parameter name."""
    if name.startswith(_STEM):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_blocks + 1


def param_groups_lrd(model: VisionTransformer, weight_decay: float, no_weight_decay_list: Collection[str],
                     layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with an "lr_scale" each (the loop multiplies the lr by it); no decay on 1-D parameters and on
    `no_weight_decay_list`."""
    num_layers = len(model.blocks) + 1
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim == 1 or name in no_weight_decay_list)
        lid = layer_id(name, len(model.blocks))
        group = groups.setdefault((lid, decay), {"params": [], "param_names": [], "apply_wd": decay,
                                                 "weight_decay": weight_decay if decay else 0.0,
                                                 "lr_scale": layer_decay ** (num_layers - lid)})
        group["params"].append(param)
        group["param_names"].append(name)
    return list(groups.values())
