"""The shared backbone: the timm `VisionTransformer` itself, headless (its state dict is what timm loads), and a
masked encode that runs on the kept tokens only."""

from __future__ import annotations

from typing import Any

import timm
import torch
from timm.models import checkpoint_seq
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from ssl_vit.config.pretrain import ModelConfig


def backbone_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    """timm `create_model` kwargs that define the architecture (what an export records)."""
    # dynamic_img_size: any input size (DINO's local crops, evaluation elsewhere); timm resamples the positions.
    kwargs = {"img_size": cfg.img_size, "patch_size": cfg.patch_size, "num_classes": 0, "dynamic_img_size": True}
    return kwargs | {k: v for k in ("embed_dim", "depth", "num_heads") if (v := getattr(cfg, k)) is not None}


def build_backbone(cfg: ModelConfig) -> VisionTransformer:
    """A randomly initialised timm ViT (fused SDPA attention is timm's default on torch 2)."""
    try:
        model = timm.create_model(cfg.name, pretrained=False, drop_path_rate=cfg.drop_path_rate, **backbone_kwargs(cfg))
    except RuntimeError as err:  # timm's "Unknown model" error
        raise ValueError(f"model.name: {err}") from None
    except TypeError as err:  # a model that is no ViT refuses the ViT keywords (patch_size, ...)
        raise ValueError(f"model.name: {cfg.name!r} is not a timm VisionTransformer ({err})") from None
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"model.name: {cfg.name!r} is a {type(model).__name__}, not a timm VisionTransformer")
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    return model


def encode(vit: VisionTransformer, images: Tensor, keep_idx: Tensor | None = None) -> Tensor:
    """Tokens after the final norm, (B, prefix + K, D); with `keep_idx` (B, K) only those patches (positions
    added) enter the blocks: MAE's speed. `keep_idx=None` equals `forward_features`."""
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)  # (B, prefix + L, D): cls/register tokens prepended, position embedding added
    if keep_idx is not None:
        n_prefix = vit.num_prefix_tokens
        patches = x[:, n_prefix:]
        kept = torch.gather(patches, 1, keep_idx.unsqueeze(-1).expand(-1, -1, patches.shape[-1]))  # (B, K, D)
        x = torch.cat([x[:, :n_prefix], kept], dim=1)
    x = vit.patch_drop(x)
    x = vit.norm_pre(x)
    checkpointed = vit.grad_checkpointing and torch.is_grad_enabled()
    return vit.norm(checkpoint_seq(vit.blocks, x) if checkpointed else vit.blocks(x))
