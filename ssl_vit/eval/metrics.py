"""Classification accuracy shared by the linear probe and fine-tuning."""

from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def topk_hits(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of rows of (N, C) `logits` whose label is among the k highest, for each k (capped at C)."""
    if (labels < 0).any():
        raise ValueError("accuracy needs labelled shards (samples with a `cls` member)")
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, k) best first
    hits = ranked == labels.unsqueeze(1)
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


def topk_accuracy(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """{"top1": %, "top5": %} of (N, C) logits against (N,) labels."""
    if logits.shape[0] == 0:
        raise ValueError("accuracy of an empty set")
    return {f"top{k}": 100.0 * n / logits.shape[0] for k, n in topk_hits(logits, labels, ks).items()}
