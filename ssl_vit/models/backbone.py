"""The shared backbone: the timm `VisionTransformer` itself, headless (its state dict is what timm loads), and an
encode that runs on the kept tokens only (MAE) or with a mask token in place of the masked patches (iBOT)."""

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
    kwargs |= {k: v for k in ("embed_dim", "depth", "num_heads") if (v := getattr(cfg, k)) is not None}
    # Only when set: unset, the timm model keeps its own (a *_reg4_dinov2 model its registers and LayerScale).
    if cfg.reg_tokens:
        kwargs["reg_tokens"] = cfg.reg_tokens
    if cfg.layer_scale_init is not None:
        kwargs["init_values"] = cfg.layer_scale_init
    return kwargs


def build_backbone(cfg: ModelConfig) -> VisionTransformer:
    """A randomly initialised timm ViT (fused SDPA attention is timm's default on torch 2); `model.init`'s weights
    are loaded into the objective built on it (models/init_weights.py)."""
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


def encode(vit: VisionTransformer, images: Tensor, keep_idx: Tensor | None = None, mask: Tensor | None = None,
           mask_token: Tensor | None = None) -> Tensor:
    """Tokens after the final norm, (B, prefix + K, D); with `keep_idx` (B, K) only those patches (positions
    added) enter the blocks: MAE's speed. With `mask` (B, L) bool, the patch embeddings where it is True are
    replaced by `mask_token` (D,) before the positions are added (iBOT/DINOv2's masked input). With neither, it
    equals `forward_features`."""
    x = vit.patch_embed(images)  # (B, gh, gw, D) with dynamic_img_size, else (B, L, D)
    if mask is not None:
        x = mask_patches(x, mask, mask_token)
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


def mask_patches(patches: Tensor, mask: Tensor, mask_token: Tensor | None) -> Tensor:
    """`patches` (B, gh, gw, D) or (B, L, D) with the row-major patches where `mask` (B, L) is True replaced by
    `mask_token` ((D,) or (1, 1, D)); gradients flow into the token."""
    if mask_token is None:
        raise ValueError("encode: a mask needs a mask_token to put in place of the masked patches")
    flat = patches.reshape(patches.shape[0], -1, patches.shape[-1])  # (B, L, D), row-major like timm's flatten
    if tuple(mask.shape) != tuple(flat.shape[:2]):
        raise ValueError(f"encode: mask has shape {list(mask.shape)}, the images have {flat.shape[1]} patches "
                         f"each in a batch of {flat.shape[0]}")
    token = mask_token.reshape(-1).to(flat.dtype)  # under autocast the patch embedding may be bf16
    return torch.where(mask.bool().unsqueeze(-1), token, flat).reshape(patches.shape)
