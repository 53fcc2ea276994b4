"""Features of a frozen backbone over labelled shards, gathered from every rank, one row per sample key."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from tqdm.auto import tqdm

from ssl_vit.backbone import encode, pool
from ssl_vit.data.shards import eval_stream
from ssl_vit.data.transforms import eval_transform


@dataclass
class Features:
    features: Tensor  # (N, D) float32 on CPU, sorted by key
    labels: Tensor  # (N,) int64, -1 where a sample has no label
    keys: list[str]


@torch.no_grad()
def extract_features(vit: VisionTransformer, shards: str | Sequence[str], accelerator: Accelerator, *,
                     pool_mode: str = "cls", batch_size: int = 256, num_workers: int = 4,
                     crop_ratio: float = 0.875, allow_pipe: bool = False, desc: str = "features") -> Features:
    """Every rank encodes its share of the shards; all ranks get the full, de-duplicated, key-sorted result."""
    vit = vit.to(accelerator.device).eval()
    transform = eval_transform(vit.patch_embed.img_size[0], crop_ratio)
    loader = eval_stream(shards, transform, batch_size=batch_size, num_workers=num_workers,
                         rank=accelerator.process_index, world_size=accelerator.num_processes,
                         allow_pipe=allow_pipe)
    feats, labels, keys = [], [], []
    for batch in tqdm(loader, desc=desc, disable=not accelerator.is_main_process, unit="batch"):
        with accelerator.autocast():
            tokens = encode(vit, batch["image"].to(accelerator.device, non_blocking=True))
        feats.append(pool(vit, tokens, pool_mode).float())
        labels.append(batch["label"].to(accelerator.device))
        keys += list(batch["key"])
    dim = vit.embed_dim if pool_mode in ("cls", "avg") else feats[0].shape[1]
    local_f = torch.cat(feats) if feats else torch.zeros(0, dim, device=accelerator.device)
    local_l = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=accelerator.device)
    all_f, all_l, all_k = _gather(accelerator, local_f, local_l, keys)
    # A sample can reach two ranks only if a shard was listed twice; keep one row per key, in key order.
    first = {}
    for i, key in enumerate(all_k):
        first.setdefault(key, i)
    order = [first[k] for k in sorted(first)]
    return Features(all_f[order].cpu(), all_l[order].cpu(), sorted(first))


def _gather(accelerator: Accelerator, feats: Tensor, labels: Tensor, keys: list[str]) -> tuple[Tensor, Tensor,
                                                                                             list[str]]:
    if accelerator.num_processes == 1:
        return feats, labels, keys
    # Ranks hold different counts: pad to the longest, gather, then cut each rank's padding away.
    counts = accelerator.gather(torch.tensor([feats.shape[0]], device=accelerator.device)).tolist()
    padded_f = accelerator.gather(accelerator.pad_across_processes(feats, dim=0))
    padded_l = accelerator.gather(accelerator.pad_across_processes(labels, dim=0))
    longest = max(counts)
    keep = torch.cat([torch.arange(r * longest, r * longest + n) for r, n in enumerate(counts)]).to(feats.device)
    all_keys = gather_object(keys)
    return padded_f[keep], padded_l[keep], all_keys
