"""Linear probes on frozen features: a grid of heads (learning rates × weight decays) trained at once, each
exactly as it would train alone (same start, same batches, a sum of per-head losses)."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from timm.optim import Lars
from torch import Tensor, nn

from ssl_vit.eval.features import Features, FeatureSpec
from ssl_vit.eval.metrics import check_labelled, topk_hits
from ssl_vit.training.optim import warmup_cosine
from ssl_vit.training.run_log import RunLog


@dataclass(frozen=True)
class ProbeProtocol:
    """A linear-probe recipe. Each head's peak lr = base_lr × batch_size / 256 (linear scaling rule)."""

    features: FeatureSpec
    batchnorm: bool  # BatchNorm1d without affine before the linear layer (MAE, after MoCo v3)
    optimizer: str  # lars (MAE) | sgd (DINO); momentum 0.9 for both
    base_lrs: tuple[float, ...]  # the lr grid
    weight_decays: tuple[float, ...]  # the weight-decay grid (on the weight matrix, never the bias)
    epochs: int
    warmup_epochs: int  # linear warmup, then cosine to 0 (per step)
    batch_size: int  # global batch
    init_std: float = 0.01  # head weights ~ N(0, init_std²), bias 0

    def __post_init__(self) -> None:
        if self.optimizer not in ("lars", "sgd"):
            raise ValueError(f"unknown probe optimizer {self.optimizer!r}; choose from ['lars', 'sgd']")
        if not self.base_lrs or not self.weight_decays:
            raise ValueError("the lr and weight-decay grids need at least one value each")
        if not all(math.isfinite(lr) and lr > 0 for lr in self.base_lrs):
            raise ValueError(f"probe base lrs must be finite and > 0, got {list(self.base_lrs)}")
        if not all(math.isfinite(wd) and wd >= 0 for wd in self.weight_decays):
            raise ValueError(f"probe weight decays must be finite and ≥ 0, got {list(self.weight_decays)}")
        if self.epochs < 1 or self.batch_size < 1 or not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"need epochs ≥ 1, batch_size ≥ 1, 0 ≤ warmup_epochs ≤ epochs; got {self.epochs}, "
                             f"{self.batch_size}, {self.warmup_epochs}")


PROTOCOL_NAMES = ("dino", "mae")


def probe_protocol(name: str, embed_dim: int) -> ProbeProtocol:
    """The papers' protocols (docs/evaluation.md#linear-probe), with an lr grid around the paper's value."""
    if name == "mae":
        return ProbeProtocol(FeatureSpec("cls"), batchnorm=True, optimizer="lars",
                             base_lrs=(0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2), weight_decays=(0.0,),
                             epochs=90, warmup_epochs=10, batch_size=16384)
    if name == "dino":
        spec = FeatureSpec("cls", n_last_blocks=4) if embed_dim < 768 else FeatureSpec("cls", avgpool=True)
        return ProbeProtocol(spec, batchnorm=False, optimizer="sgd",
                             base_lrs=(1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3), weight_decays=(0.0,),
                             epochs=100, warmup_epochs=0, batch_size=1024)
    raise ValueError(f"unknown probe protocol {name!r}; choose from {list(PROTOCOL_NAMES)}")


def customize(proto: ProbeProtocol, *, pool: str | None = None, n_last_blocks: int | None = None,
              avgpool: bool | None = None, base_lrs: Sequence[float] | None = None,
              weight_decays: Sequence[float] | None = None, epochs: int | None = None,
              warmup_epochs: int | None = None, batch_size: int | None = None) -> ProbeProtocol:
    """`proto` with every value that is not None replaced (the command-line overrides). Asking for pool avg
    drops the protocol's avgpool (appending the mean patch token to itself), unless avgpool is given too."""
    f = proto.features
    if avgpool is None:
        avgpool = False if pool == "avg" else f.avgpool
    features = FeatureSpec(f.pool if pool is None else pool,
                           f.n_last_blocks if n_last_blocks is None else n_last_blocks, avgpool)
    changes = {"base_lrs": base_lrs and tuple(base_lrs), "weight_decays": weight_decays and tuple(weight_decays),
               "epochs": epochs, "warmup_epochs": warmup_epochs, "batch_size": batch_size}
    return dataclasses.replace(proto, features=features, **{k: v for k, v in changes.items() if v is not None})


class HeadGrid(nn.Module):
    """Optional shared BatchNorm (no affine: identical for every head) + one linear head per grid point."""

    def __init__(self, dim: int, num_classes: int, n_heads: int, batchnorm: bool, init_std: float,
                 seed: int = 0) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if batchnorm else nn.Identity()
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(n_heads))
        weight = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed)) * init_std
        with torch.no_grad():
            for head in self.heads:  # the same start for every head, whatever the grid
                head.weight.copy_(weight)
                head.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        """(B, D) features → (H, B, C) logits of every head."""
        x = self.norm(x)
        weight = torch.stack([h.weight for h in self.heads])  # (H, C, D)
        bias = torch.stack([h.bias for h in self.heads])  # (H, C)
        return torch.einsum("bd,hcd->hbc", x, weight) + bias[:, None]


class HeadTrainer:
    """Trains a HeadGrid step by step (lr schedule per step), evaluates every head, keeps the best epochs."""

    def __init__(self, proto: ProbeProtocol, dim: int, num_classes: int, batch_size: int, steps_per_epoch: int,
                 seed: int, device: torch.device | str) -> None:
        self.proto, self.steps_per_epoch, self.device = proto, steps_per_epoch, device
        self.grid = [(lr, wd) for lr in proto.base_lrs for wd in proto.weight_decays]
        self.names = [f"lr{lr:g}_wd{wd:g}" for lr, wd in self.grid]
        self.model = HeadGrid(dim, num_classes, len(self.grid), proto.batchnorm, proto.init_std, seed).to(device)
        groups: list[dict[str, Any]] = []
        for head, (base_lr, wd) in zip(self.model.heads, self.grid, strict=True):
            peak = base_lr * batch_size / 256
            # LARS adapts the weight matrix only; biases get neither adaptation nor decay (as in MAE's LARS).
            groups.append({"params": [head.weight], "weight_decay": wd, "peak_lr": peak, "always_adapt": True})
            groups.append({"params": [head.bias], "weight_decay": 0.0, "peak_lr": peak, "always_adapt": False})
        if proto.optimizer == "lars":
            self.optimizer: torch.optim.Optimizer = Lars(groups, lr=0.0, momentum=0.9)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=0.0, momentum=0.9)
        self.history: list[list[dict[str, float]]] = []  # per epoch, per head: top1, top5

    def step(self, model: nn.Module, x: Tensor, y: Tensor, step: int,
             backward: Callable[[Tensor], None] | None = None) -> float:
        """One optimizer step of every head; `model` is the grid, possibly wrapped for distributed training
        (then pass `accelerator.backward`)."""
        total = self.proto.epochs * self.steps_per_epoch
        warmup = self.proto.warmup_epochs * self.steps_per_epoch
        for group in self.optimizer.param_groups:
            group["lr"] = warmup_cosine(step, total, warmup, group["peak_lr"])
        logits = model(x)  # (H, B, C); a sum of each head's mean loss: head i's gradient is what it would be alone
        n_heads, batch = logits.shape[:2]
        per_sample = F.cross_entropy(logits.flatten(0, 1).float(), y.repeat(n_heads), reduction="none")
        loss = per_sample.view(n_heads, batch).mean(dim=1).sum()
        self.optimizer.zero_grad(set_to_none=True)
        (backward or Tensor.backward)(loss)
        self.optimizer.step()
        return float(loss.detach()) / len(self.grid)

    @torch.no_grad()
    def evaluate(self, val: Features, chunk: int = 4096) -> list[dict[str, float]]:
        """Top-1/top-5 (%) of every head on `val` (BatchNorm with its running statistics)."""
        self.model.eval()
        hits = [Counter() for _ in self.grid]
        for x, y in zip(val.features.split(chunk), val.labels.split(chunk), strict=True):
            for i, head_logits in enumerate(self.model(x.to(self.device))):  # (chunk, C) per head
                hits[i].update(topk_hits(head_logits, y.to(self.device)))
        self.model.train()
        scores = [{f"top{k}": 100.0 * h[k] / val.features.shape[0] for k in (1, 5)} for h in hits]
        self.history.append(scores)
        return scores

    def fit(self, batches: Iterator[tuple[Tensor, Tensor]], val: Features, model: nn.Module | None = None,
            backward: Callable[[Tensor], None] | None = None, log: RunLog | None = None) -> dict[str, Any]:
        """Train on (features, labels) `batches` for the protocol's epochs, evaluating every head on `val` after
        each (logged: mean train loss, every head's val top-1 and the best), then `summary()`."""
        losses = []
        for step, (x, y) in enumerate(islice(batches, self.proto.epochs * self.steps_per_epoch)):
            losses.append(self.step(model or self.model, x, y, step, backward))
            if (step + 1) % self.steps_per_epoch == 0:
                scores = self.evaluate(val)
                if log is not None:
                    heads = {f"probe_top1/{name}": s["top1"] for name, s in zip(self.names, scores, strict=True)}
                    log.scalars((step + 1) // self.steps_per_epoch, {"probe/train_loss": sum(losses) / len(losses),
                                "probe/best_top1": max(s["top1"] for s in scores), **heads})
                losses = []
        return self.summary()

    def summary(self) -> dict[str, Any]:
        """Per head its best epoch on val (and the final one); `best` is the head with the highest top-1."""
        heads = []
        for i, ((lr, wd), name) in enumerate(zip(self.grid, self.names, strict=True)):
            per_epoch = [epoch[i] for epoch in self.history]
            best = max(range(len(per_epoch)), key=lambda e: (per_epoch[e]["top1"], per_epoch[e]["top5"]))
            heads.append({"name": name, "base_lr": lr, "weight_decay": wd, "best_epoch": best + 1,
                          **per_epoch[best], "final_top1": per_epoch[-1]["top1"]})
        return {"heads": heads, "best": max(heads, key=lambda h: (h["top1"], h["top5"]))}


def probe_features(train: Features, val: Features, proto: ProbeProtocol, num_classes: int | None = None,
                   device: torch.device | str = "cpu", seed: int = 0, log: RunLog | None = None,
                   ) -> tuple[dict[str, Any], HeadTrainer]:
    """Fast path: train the whole grid on fixed features; returns the summary and the trainer (heads inside)."""
    bound = (num_classes, "given") if num_classes else ()  # else MAX_CLASSES: a corrupt label would size the heads
    check_labelled(train.labels, "the linear probe", "train", *bound)
    check_labelled(val.labels, "the linear probe", "val", *bound)
    if train.features.shape[0] == 0 or val.features.shape[0] == 0:
        raise ValueError("the linear probe needs a non-empty train and val set")
    num_classes = num_classes or int(max(train.labels.max(), val.labels.max())) + 1
    n = train.features.shape[0]
    batch = min(proto.batch_size, n)
    trainer = HeadTrainer(proto, train.features.shape[1], num_classes, batch, n // batch, seed, device)
    x, y = train.features.to(device), train.labels.to(device)
    order = torch.Generator().manual_seed(seed)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        while True:
            perm = torch.randperm(n, generator=order)
            for s in range(trainer.steps_per_epoch):  # full batches only, as the papers' loaders (drop_last)
                idx = perm[s * batch:(s + 1) * batch].to(device)
                yield x[idx], y[idx]
    return trainer.fit(batches(), val, log=log), trainer


@dataclass(frozen=True)
class ProbeData:
    """Where the labelled images come from and how they are read."""

    train: str  # labelled train shards
    val: str  # labelled val shards
    batch_size: int = 256  # per-device batch of feature extraction
    num_workers: int = 4  # loader workers per rank
    crop_ratio: float = 0.875  # eval resize/centre-crop ratio
    allow_pipe: bool = False  # allow pipe: shard URLs
    cache_dir: str | None = None  # feature cache (fast path, and the val features of the slow path)
    shuffle_buffer: int = 5000  # slow path: samples shuffled per worker
    train_size: int | None = None  # slow path: samples per epoch; None = counted from the tar headers
