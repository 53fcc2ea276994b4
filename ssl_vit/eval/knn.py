"""Weighted k-NN on frozen features (Wu et al. 2018, as used by DINO): neighbours vote with exp(cos / T)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from ssl_vit.config import EvalConfig
from ssl_vit.eval.features import FeatureSpec, extract_features


@torch.no_grad()
def knn_classify(train_feats: Tensor, train_labels: Tensor, val_feats: Tensor, val_labels: Tensor,
                 ks: Sequence[int] = (20,), temperature: float = 0.07,
                 chunk: int = 1024) -> dict[int, dict[str, float]]:
    """Top-1 / top-5 accuracy (%) of the val set for each k, in one pass over the similarity matrix."""
    if train_feats.shape[0] == 0 or val_feats.shape[0] == 0:
        raise ValueError("k-NN needs a non-empty train and val set")
    if (train_labels < 0).any() or (val_labels < 0).any():
        raise ValueError("k-NN needs labelled shards (samples with a `cls` member)")
    n_classes = int(max(train_labels.max(), val_labels.max())) + 1
    train = F.normalize(train_feats.float(), dim=1)
    val = F.normalize(val_feats.float(), dim=1)
    k_max = min(max(ks), train.shape[0])
    top5 = min(5, n_classes)
    correct = {k: [0, 0] for k in ks}  # top-1, top-5 hits
    for start in range(0, val.shape[0], chunk):
        sim = val[start:start + chunk] @ train.T  # (C, N) cosine similarities
        sim_k, idx = sim.topk(k_max, dim=1)  # neighbours, most similar first
        neighbour_labels = train_labels[idx]  # (C, k_max)
        target = val_labels[start:start + chunk].unsqueeze(1)
        for k in ks:
            k_eff = min(k, k_max)
            weights = (sim_k[:, :k_eff] / temperature).exp()
            votes = torch.zeros(sim.shape[0], n_classes, device=sim.device)
            votes.scatter_add_(1, neighbour_labels[:, :k_eff], weights)  # (C, classes) summed weights
            top_votes, ranked = votes.topk(top5, dim=1)  # (C, top5)
            # A class no neighbour voted for ties with every other such class: never count it as a hit.
            hits = (ranked == target) & (top_votes > 0)
            correct[k][0] += int(hits[:, 0].sum())
            correct[k][1] += int(hits.any(dim=1).sum())
    n = val.shape[0]
    return {k: {"top1": 100.0 * c[0] / n, "top5": 100.0 * c[1] / n} for k, c in correct.items()}


def knn_eval(vit: VisionTransformer, cfg: EvalConfig, accelerator: Accelerator,
             ks: Sequence[int] | None = None, allow_pipe: bool = False, spec: FeatureSpec | None = None,
             cache_dir: str | Path | None = None) -> dict[int, dict[str, float]]:
    """Extract features of `cfg.knn_train` and `cfg.knn_val` with a frozen `vit`, then classify by k-NN.

    `spec` defaults to `cfg.pool` of the last block; `cache_dir` caches the features (see extract_features).
    """
    if not cfg.knn_train or not cfg.knn_val:
        raise ValueError("k-NN needs labelled shards: set eval.knn_train and eval.knn_val (or --train/--val)")
    kwargs = dict(spec=spec or FeatureSpec(pool=cfg.pool), batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                  crop_ratio=cfg.crop_ratio, allow_pipe=allow_pipe, cache_dir=cache_dir)
    train = extract_features(vit, cfg.knn_train, accelerator, desc="k-NN train features", **kwargs)
    val = extract_features(vit, cfg.knn_val, accelerator, desc="k-NN val features", **kwargs)
    return knn_classify(train.features, train.labels, val.features, val.labels, ks or (cfg.knn_k,),
                        cfg.knn_temperature)
