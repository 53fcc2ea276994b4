"""Weighted k-NN on frozen features (Wu et al. 2018, as used by DINO): neighbours vote with exp(cos / T)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from ssl_vit.config.pretrain import EvalConfig
from ssl_vit.eval.features import FeatureSpec, extract_features
from ssl_vit.eval.labelled import check_class_lists, check_usable
from ssl_vit.eval.metrics import check_labelled


def check_knn_args(ks: Sequence[int], temperature: float, n_train: int | None = None) -> None:
    """One-line errors for ks and T that would give a wrong score silently (a repeated k counted its hits twice);
    a k above the train-set size would only repeat the score of k = n_train under another name."""
    if not ks:
        raise ValueError("k-NN needs at least one k")
    if len(set(ks)) != len(ks):
        raise ValueError(f"k-NN ks {list(ks)} repeat a value; give each k once")
    for k in ks:
        if k < 1:
            raise ValueError(f"k-NN k must be ≥ 1, got {k}")
        if n_train is not None and k > n_train:
            raise ValueError(f"k-NN k={k} exceeds the {n_train} train samples; choose k ≤ {n_train}")
    if not 0 < temperature < math.inf:  # also refuses NaN
        raise ValueError(f"k-NN temperature must be finite and > 0, got {temperature}")


@torch.no_grad()
def knn_classify(train_feats: Tensor, train_labels: Tensor, val_feats: Tensor, val_labels: Tensor,
                 ks: Sequence[int] = (20,), temperature: float = 0.07,
                 chunk: int = 1024) -> dict[int, dict[str, float]]:
    """Top-1 / top-5 accuracy (%) of the val set for each k, in one pass over the similarity matrix."""
    if train_feats.shape[0] == 0 or val_feats.shape[0] == 0:
        raise ValueError("k-NN needs a non-empty train and val set")
    check_labelled(train_labels, "k-NN", "train")
    check_labelled(val_labels, "k-NN", "val")
    check_knn_args(ks, temperature, train_feats.shape[0])
    n_classes = int(max(train_labels.max(), val_labels.max())) + 1
    train, val = (F.normalize(f.float(), dim=1) for f in (train_feats, val_feats))
    correct = {k: [0, 0] for k in ks}  # top-1, top-5 hits
    for start in range(0, val.shape[0], chunk):
        sim = val[start:start + chunk] @ train.T  # (C, N) cosine similarities
        sim_k, idx = sim.topk(max(ks), dim=1)  # neighbours, most similar first
        neighbour_labels = train_labels[idx]  # (C, k_max)
        target = val_labels[start:start + chunk].unsqueeze(1)
        for k in ks:
            # exp(sim / T) relative to each row's nearest neighbour: the same ranking, no overflow at small T
            weights = ((sim_k[:, :k] - sim_k[:, :1]) / temperature).exp()
            votes = torch.zeros(sim.shape[0], n_classes, device=sim.device)
            votes.scatter_add_(1, neighbour_labels[:, :k], weights)  # (C, classes) summed weights
            voted = torch.zeros_like(votes, dtype=torch.bool).scatter_(1, neighbour_labels[:, :k], True)
            # a class voted for ranks above every class that was not, even where its weight underflowed to 0
            _, ranked = votes.masked_fill(~voted, -1.0).topk(min(5, n_classes), dim=1)  # (C, top-5)
            # a class no neighbour voted for ties with every other such class: never a hit (asked of `voted`, as above)
            hits = (ranked == target) & voted.gather(1, ranked)
            correct[k][0] += int(hits[:, 0].sum())
            correct[k][1] += int(hits.any(dim=1).sum())
    return {k: {"top1": 100.0 * c[0] / len(val), "top5": 100.0 * c[1] / len(val)} for k, c in correct.items()}


@dataclass
class KnnReport:
    scores: dict[int, dict[str, float]]  # per k: top1, top5 (%)
    n_train: int  # samples in the memory bank
    n_val: int  # samples classified
    skipped: dict[str, dict[str, int]]  # {"train": {reason: count}, "val": {...}}: unusable samples, left out

    def to_json(self) -> dict[str, Any]:
        """{"<k>": {"top1", "top5"}, ..., "n_train", "n_val", "skipped"}: the scores keyed as before."""
        return {**{str(k): r for k, r in self.scores.items()}, "n_train": self.n_train, "n_val": self.n_val,
                "skipped": self.skipped}


def knn_report(vit: VisionTransformer, cfg: EvalConfig, accelerator: Accelerator,
               ks: Sequence[int] | None = None, allow_pipe: bool = False, spec: FeatureSpec | None = None,
               cache_dir: str | Path | None = None) -> KnnReport:
    """k-NN scores of a frozen `vit` on `cfg.knn_train`/`cfg.knn_val` (same class lists), with the set sizes and
    skipped samples; `spec` defaults to `cfg.pool` of the last block, `cache_dir` caches the features."""
    if not cfg.knn_train or not cfg.knn_val:
        raise ValueError("k-NN needs labelled shards: set eval.knn_train and eval.knn_val (or --train/--val)")
    ks = tuple(ks or (cfg.knn_k,))
    check_knn_args(ks, cfg.knn_temperature)  # before the backbone runs
    classes = check_class_lists(cfg.knn_train, cfg.knn_val, allow_pipe)
    kwargs = dict(spec=spec or FeatureSpec(pool=cfg.pool), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                  crop_ratio=cfg.crop_ratio, allow_pipe=allow_pipe, cache_dir=cache_dir)
    train = extract_features(vit, cfg.knn_train, accelerator, desc="k-NN train features", **kwargs)
    check_usable(train, "k-NN", "train", classes)  # else "k exceeds the 0 train samples", which hides why
    check_knn_args(ks, cfg.knn_temperature, train.features.shape[0])
    val = extract_features(vit, cfg.knn_val, accelerator, desc="k-NN val features", **kwargs)
    check_usable(val, "k-NN", "val", classes)
    scores = knn_classify(train.features, train.labels, val.features, val.labels, ks, cfg.knn_temperature)
    return KnnReport(scores, train.features.shape[0], val.features.shape[0],
                     {"train": train.skipped, "val": val.skipped})
