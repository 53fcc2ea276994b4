"""Classification accuracy shared by the linear probe and fine-tuning."""

from __future__ import annotations

import torch
from torch import Tensor


def check_labelled(labels: Tensor, task: str, split: str) -> None:
    """Refuse a set with unlabelled samples (label -1: no `cls` member), saying how many of how many."""
    missing = int((labels < 0).sum())
    if missing:
        raise ValueError(f"{task} needs labelled shards (samples with a `cls` member): {missing} of "
                         f"{labels.numel()} {split} samples have none")


@torch.no_grad()
def topk_hits(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of rows of (N, C) `logits` whose label is among the k highest, for each k (capped at C)."""
    check_labelled(labels, "accuracy", "evaluated")
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, k) best first
    hits = ranked == labels.unsqueeze(1)
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


def topk_accuracy(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """{"top1": %, "top5": %} of (N, C) logits against (N,) labels."""
    if logits.shape[0] == 0:
        raise ValueError("accuracy of an empty set")
    return {f"top{k}": 100.0 * n / logits.shape[0] for k, n in topk_hits(logits, labels, ks).items()}
