"""Classification accuracy shared by the linear probe and fine-tuning."""

from __future__ import annotations

import torch
from torch import Tensor

MAX_CLASSES = 100_000  # labels without a class list must be below it: a corrupt one would size the votes or heads
NO_LIST = "allowed without a classes.txt"


def check_labelled(labels: Tensor, task: str, split: str, n: int = MAX_CLASSES, where: str = NO_LIST) -> None:
    """Refuse unlabelled samples (label -1: no `cls` member) and labels ≥ `n`, the number of classes `where`
    ("in A/classes.txt", "of the model")."""
    missing = int((labels < 0).sum())
    if missing:
        raise ValueError(f"{task} needs labelled shards (samples with a `cls` member): {missing} of "
                         f"{labels.numel()} {split} samples have none")
    beyond = labels >= n
    if beyond.any():
        raise ValueError(f"{task} {split} labels must be < the {n} classes {where}: {int(beyond.sum())} of "
                         f"{labels.numel()} samples have a larger one (up to {int(labels.max())})")


@torch.no_grad()
def topk_hits(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[int, int]:
    """Number of rows of (N, C) `logits` whose label is among the k highest, for each k (capped at C)."""
    check_labelled(labels, "accuracy", "evaluated", logits.shape[1], "of the logits")
    ranked = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices  # (N, k) best first
    hits = ranked == labels.unsqueeze(1)
    return {k: int(hits[:, :k].any(dim=1).sum()) for k in ks}


def topk_accuracy(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """{"top1": %, "top5": %} of (N, C) logits against (N,) labels."""
    if logits.shape[0] == 0:
        raise ValueError("accuracy of an empty set")
    return {f"top{k}": 100.0 * n / logits.shape[0] for k, n in topk_hits(logits, labels, ks).items()}
