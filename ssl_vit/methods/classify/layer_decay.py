"""Layer-wise lr decay for fine-tuning a ViT, as MAE's `util/lr_decay.py` assigns it.

With L blocks there are L + 2 layer ids: 0 for the stem (cls token, position embedding, patch embedding),
i + 1 for block i, L + 1 for everything after the blocks (final norm, fc_norm, head). Layer id n gets
lr × decay^(L + 1 − n): the head side trains at the full lr, each step towards the input a factor decay less.
timm's `param_groups_layer_decay` differs on one point: its ViT group matcher counts the final `norm` into
the last block's group (lr × decay), so with `pool: cls` the norm would train slower than MAE's.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from timm.models.vision_transformer import VisionTransformer

# Everything that acts before the first block. timm's optional pre-norm and register tokens are not in MAE's
# models; they sit on the input side of the blocks, so they take the stem's id.
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
    """AdamW param groups with an "lr_scale" each (the loop multiplies the schedule's lr by it every step); no weight
    decay (`apply_wd` false) on 1-D parameters (norms, biases) and on `no_weight_decay_list` (cls token, position
    embedding)."""
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
