"""DINO's loss (Caron et al., 2021, Algorithm 1): a centered, sharpened teacher as the student's target.

    targets = softmax((teacher_out - center) / τt)             # centered, sharpened teacher (no gradient)
    loss = mean over pairs (t, s), s ≠ t, of H(targets_t, softmax(student_out_s / τs))
    center ← m·center + (1 - m)·mean(teacher_out)               # over the global batch

or, instead of the center, Sinkhorn-Knopp targets (DINOv2; SwAV's equipartition): `sinkhorn_knopp`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def teacher_targets(teacher_out: Tensor, center: Tensor, temperature: float) -> Tensor:
    """Centered (against one-dimension collapse), sharpened (against uniform collapse) targets: (N, K)."""
    return F.softmax((teacher_out.float() - center) / temperature, dim=-1)


def dino_loss(student_out: Tensor, targets: Tensor, n_crops: int, student_temp: float) -> Tensor:
    """Mean over the (teacher view t, student view s ≠ t) pairs of the batch-mean H(targets_t, student_s).
    `student_out` (n_crops·B, K): the crops in order, the teacher's T views first; `targets` (T·B, K)."""
    if n_crops < 2 or student_out.shape[0] % n_crops:
        raise ValueError(f"student output of {student_out.shape[0]} rows does not split into {n_crops} crops")
    batch = student_out.shape[0] // n_crops
    n_teacher = targets.shape[0] // batch
    if targets.shape[0] != n_teacher * batch or not 1 <= n_teacher <= n_crops:
        raise ValueError(f"{targets.shape[0]} teacher rows are not 1 to {n_crops} views of batch {batch}")
    log_p = F.log_softmax(student_out.float() / student_temp, dim=-1).view(n_crops, batch, -1)  # (V, B, K)
    q = targets.view(n_teacher, batch, -1)  # (T, B, K)
    # Σ over all pairs = (Σ_t q_t)·(Σ_s log p_s) minus the same-view pairs: O(V + T) products, not O(V·T).
    all_pairs = (q.sum(0) * log_p.sum(0)).sum(-1)  # (B,)
    same_view = (q * log_p[:n_teacher]).sum(dim=(0, 2))  # (B,)
    n_pairs = n_teacher * (n_crops - 1)
    return -(all_pairs - same_view).mean() / n_pairs


@torch.no_grad()
def sinkhorn_knopp(teacher_out: Tensor, temperature: float, iterations: int = 3) -> Tensor:
    """Targets (N, K) from exp(teacher_out / τt) rescaled in turn so that every prototype holds 1/K of the global
    batch's mass and every sample 1/N, `iterations` times, ending on the samples: each row sums to 1. Sums over
    rows (and N) are all-reduced under a process group, so the batch is every rank's."""
    logits = teacher_out.float() / temperature
    group = dist.is_available() and dist.is_initialized()
    # A shift common to all ranks cancels in the first normalisation and keeps exp from overflowing.
    shift = logits.amax() if logits.numel() else logits.new_full((), -torch.inf)
    if group:
        dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    q = torch.exp(logits - shift)  # (N, K)
    totals = torch.stack([q.sum(), q.new_full((), q.shape[0])])  # mass, rows
    if group:
        dist.all_reduce(totals)
    q /= totals[0]
    tiny = torch.finfo(q.dtype).tiny  # an underflowed row or prototype stays 0 instead of 0 / 0
    for _ in range(iterations):
        per_prototype = q.sum(dim=0, keepdim=True)  # (1, K), over the global batch
        if group:
            dist.all_reduce(per_prototype)
        q /= per_prototype.clamp_min(tiny) * q.shape[1]
        q /= q.sum(dim=1, keepdim=True).clamp_min(tiny) * totals[1]
    return q * totals[1]


@torch.no_grad()
def center_stats(teacher_out: Tensor) -> Tensor:
    """(K + 1,): column sums, then row count: summed over micro-batches and ranks, the step's true mean."""
    # new_full is a fill kernel; new_tensor([rows]) would be a blocking host-to-device copy every micro-batch
    rows = teacher_out.new_full((1,), teacher_out.shape[0], dtype=torch.float32)
    return torch.cat([teacher_out.float().sum(dim=0), rows])


@torch.no_grad()
def update_center(center: Tensor, stats: Tensor, momentum: float) -> None:
    """center ← momentum·center + (1 − momentum)·(mean teacher output over every rank's `center_stats`), in
    place; a collective under a process group (also runs without one)."""
    stats = stats.clone()  # all_reduce works in place; the caller's sums stay its own
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(stats)
    batch_mean = stats[:-1] / stats[-1]  # (K,)
    center.mul_(momentum).add_(batch_mean.unsqueeze(0), alpha=1.0 - momentum)


def mean_entropy(probs: Tensor) -> Tensor:
    """Mean over rows of the entropy (nats) of each row's distribution: 0 if one-hot, log K if uniform."""
    return torch.special.entr(probs.float()).sum(dim=-1).mean()
