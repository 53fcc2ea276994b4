"""DINOv2's added losses (Oquab et al., 2023): iBOT's masked-patch cross-entropy and the KoLeo regulariser. The cls
loss, the centering and Sinkhorn-Knopp are DINO's (ssl_vit/methods/dino/loss.py).

    ibot  = 1/N Σ_n 1/|M_n| Σ_{l ∈ M_n} H(targets_nl, softmax(student_nl / τs))   # masked patches of crop n
    koleo = −1/B Σ_i log min_{j ≠ i} ‖x̂_i − x̂_j‖                                  # x̂ = x / ‖x‖, per crop
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ibot_loss(student_out: Tensor, targets: Tensor, weight: Tensor, n_images: int, student_temp: float) -> Tensor:
    """Mean over the N = `n_images` global crops of each crop's mean cross-entropy over its masked patches (a crop
    with none adds 0, as in DINOv2). `student_out`, `targets` (M, K): one row per masked patch; `weight` (M,):
    1 / (masked patches of its crop)."""
    log_p = F.log_softmax(student_out.float() / student_temp, dim=-1)
    per_patch = -(targets * log_p).sum(dim=-1)  # (M,)
    return (per_patch * weight).sum() / n_images


def koleo_loss(features: Tensor, eps: float = 1e-8) -> Tensor:
    """Kozachenko-Leonenko entropy estimate (Sablayrolles et al., 2019): −mean log of each L2-normalised row's
    distance to its nearest other row. Spreads the batch's features; 0 for a batch of one (no neighbour)."""
    if features.shape[0] < 2:
        return features.sum() * 0.0  # keeps the graph (every parameter still gets a gradient)
    x = F.normalize(features.float(), dim=-1, eps=eps)
    with torch.no_grad():  # the neighbour is picked, not differentiated: the distance to it is
        cos = x @ x.T
        cos.fill_diagonal_(-torch.inf)
        nearest = cos.argmax(dim=1)
    distances = (x - x[nearest]).norm(dim=-1)
    return -torch.log(distances + eps).mean()
