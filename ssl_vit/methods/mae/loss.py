"""MAE's loss: mean squared error on the hidden patches only, against raw or per-patch normalised pixels."""

from __future__ import annotations

from torch import Tensor


def pixel_target(patches: Tensor, norm_pix: bool, eps: float = 1e-6) -> Tensor:
    """The regression target: raw patches, or each patch normalised by its own mean and variance."""
    if not norm_pix:
        return patches
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error per patch, averaged over the hidden patches only (mask 1 = hidden)."""
    per_patch = ((pred - target) ** 2).mean(dim=-1)  # (B, L)
    return (per_patch * mask).sum() / mask.sum()
