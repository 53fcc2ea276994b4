"""Gram anchoring (DINOv3, Siméoni et al. 2025, Sec. 4.2): keep the student's patch-to-patch similarities close to
those of a Gram teacher, here the frozen starting backbone (DINOv3's is an earlier EMA teacher, refreshed).

    X_S, X_G = L2-normalised patch features (P, D) of one global crop: student, Gram teacher (after the final norm)
    L_Gram = ‖X_S X_Sᵀ − X_G X_Gᵀ‖²_F / P², averaged over the global crops of the batch

The division by P² (over all patches, masked ones included) is the reference implementation's; what differs from
DINOv3: docs/dino.md, "Gram anchoring".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gram_loss(student_patches: Tensor, anchor_patches: Tensor) -> Tensor:
    """L_Gram of (N, P, D) student and Gram-teacher patch features of the same N crops: mean over crops and
    patch pairs of the squared difference of their cosine similarities."""
    if student_patches.shape != anchor_patches.shape or student_patches.ndim != 3:
        raise ValueError(f"gram_loss: patch features of shapes {list(student_patches.shape)} and "
                         f"{list(anchor_patches.shape)}; both must be (crops, patches, dim) and equal")
    # fp32 even under autocast: the loss is a difference of similarities close to each other
    with torch.autocast(student_patches.device.type, enabled=False):
        s = F.normalize(student_patches.float(), dim=-1)
        g = F.normalize(anchor_patches.float(), dim=-1)
        return (s @ s.transpose(1, 2) - g @ g.transpose(1, 2)).square().mean()  # (N, P, P) → ()

