"""Attention weights of a timm ViT whose blocks keep their fused attention kernel (SDPA never returns weights).

A forward hook on each chosen block's `attn.qkv` projection captures q and k; softmax(q kᵀ · scale) is
recomputed from them for those blocks only. Nothing in the model changes: no global `fused_attn` switch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor


def attention_from_qkv(attn: Attention, qkv: Tensor) -> Tensor:
    """(B, heads, N, N) attention weights from the (B, N, 3·heads·head_dim) output of `attn.qkv`."""
    b, n, _ = qkv.shape
    q, k, _ = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)  # (B, heads, N, head_dim)
    return ((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1)


@torch.no_grad()
def attention_maps(vit: VisionTransformer, images: Tensor, layers: Sequence[int] | None = None) -> list[Tensor]:
    """Attention weights (B, heads, N, N) of the blocks `layers` (default: all), in block order.

    N = prefix tokens + patches. The forward pass is the model's own (`forward_features`, eval mode).
    """
    depth = len(vit.blocks)
    layers = list(range(depth)) if layers is None else [i % depth for i in layers]
    found: dict[int, Tensor] = {}
    handles = []
    for i in sorted(set(layers)):
        attn = vit.blocks[i].attn
        if not isinstance(attn, Attention):
            raise ValueError(f"block {i} uses {type(attn).__name__}; attention maps need timm's Attention")

        def hook(module: torch.nn.Module, inputs: tuple, qkv: Tensor, i: int = i, attn: Attention = attn) -> None:
            found[i] = attention_from_qkv(attn, qkv)

        handles.append(attn.qkv.register_forward_hook(hook))
    was_training = vit.training
    try:
        vit.eval()
        vit.forward_features(images)
    finally:
        for handle in handles:
            handle.remove()
        vit.train(was_training)
    return [found[i] for i in layers]


def attention_rollout(maps: Sequence[Tensor], head_fusion: str = "mean") -> Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): (B, N, N) flow from every token to every input token.

    Per layer the heads are fused, the identity (the residual path) added and rows renormalised; the layers'
    matrices are multiplied through from the first block to the last.
    """
    if head_fusion not in ("mean", "max", "min"):
        raise ValueError(f"unknown head_fusion {head_fusion!r}; choose from ['max', 'mean', 'min']")
    if not maps:
        raise ValueError("attention rollout needs at least one layer")
    rollout = None
    for a in maps:
        fused = getattr(a.float(), head_fusion)(dim=1)  # (B, N, N)
        fused = fused.values if isinstance(fused, tuple) else fused  # max/min return (values, indices)
        fused = fused + torch.eye(fused.shape[-1], device=fused.device)
        fused = fused / fused.sum(dim=-1, keepdim=True)
        rollout = fused if rollout is None else fused @ rollout
    return rollout


def cls_to_patches(attn: Tensor, n_prefix: int, grid: tuple[int, int]) -> Tensor:
    """The cls token's row over the patch tokens as maps: (B, [heads,] N, N) → (B, [heads,] gh, gw)."""
    row = attn[..., 0, n_prefix:]
    return row.reshape(*row.shape[:-1], *grid)


def mass_mask(maps: Tensor, keep: float) -> Tensor:
    """Bool mask of the highest-valued cells holding a `keep` share of each map's total (DINO's threshold).

    Over the last two dims: a cell is kept when the mass of all larger cells is still below `keep`.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    flat = maps.flatten(-2)
    values, order = flat.sort(dim=-1, descending=True)
    share = values / values.sum(dim=-1, keepdim=True)
    before = share.cumsum(dim=-1) - share  # mass of the strictly larger cells
    keep_sorted = before < keep
    mask = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return mask.view(maps.shape)
