"""Features of a frozen backbone over labelled shards, gathered from every rank, one row per sample read
(docs/evaluation.md#features)."""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from tqdm import tqdm  # not tqdm.auto: its asyncio flavour calls iter() on the loader twice (workers twice)

from ssl_vit.data.samples import SKIP_REASONS
from ssl_vit.data.shard_urls import resolve_shards
from ssl_vit.data.shards import eval_stream
from ssl_vit.data.transforms import eval_transform
from ssl_vit.eval.feature_cache import cache_path, load_cached, save_cached

log = logging.getLogger(__name__)

POOLS = ("avg", "cls")
_TIE_VALUES = 8  # leading values of a row that order samples sharing a key


@dataclass(frozen=True)
class FeatureSpec:
    """Which tokens make an image's feature vector."""

    pool: str = "cls"  # cls token or mean patch token, taken from each of the last `n_last_blocks` blocks
    n_last_blocks: int = 1  # blocks whose (normed) output is pooled and concatenated, last block last
    avgpool: bool = False  # also append the last block's mean patch token (DINO's ViT-B linear probe)

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"unknown pool {self.pool!r}; choose from {list(POOLS)}")
        if self.n_last_blocks < 1:
            raise ValueError(f"n_last_blocks must be ≥ 1, got {self.n_last_blocks}")
        if self.avgpool and self.pool == "avg":
            raise ValueError("avgpool appends the mean patch token to cls features; with pool=avg it is already there")

    def dim(self, embed_dim: int) -> int:
        return embed_dim * (self.n_last_blocks + int(self.avgpool))

    def describe(self) -> str:
        name = self.pool if self.n_last_blocks == 1 else f"{self.pool} of the last {self.n_last_blocks} blocks"
        return name + (" + avg" if self.avgpool else "")


def no_skips() -> dict[str, int]:
    return dict.fromkeys(SKIP_REASONS, 0)


@dataclass
class Features:
    features: Tensor  # (N, D) float32 on CPU, sorted by key
    labels: Tensor  # (N,) int64, -1 where a sample has no label
    keys: list[str]  # may repeat: shards written apart can reuse keys for different images
    skipped: dict[str, int] = field(default_factory=no_skips)  # unusable samples by reason, all ranks summed


def describe_skipped(skipped: dict[str, int]) -> str:
    """`none skipped` or `5 skipped (corrupt_image 5)`."""
    total = sum(skipped.values())
    if not total:
        return "none skipped"
    return f"{total} skipped (" + ", ".join(f"{r} {n}" for r, n in skipped.items() if n) + ")"


def distinct_shards(shards: str | Sequence[str], allow_pipe: bool = False) -> str | Sequence[str]:
    """`shards` with every shard once: one named twice (a folder and a pattern) would be counted twice."""
    urls = resolve_shards(shards, allow_pipe)
    first: dict[str, str] = {}  # each file by its real path, under its first name
    for url in urls:
        local = url.removeprefix("file:")
        first.setdefault(os.path.realpath(local) if os.path.isfile(local) else url, url)
    unique = list(first.values())
    if len(unique) == len(urls):
        return shards  # unchanged: resolving an already resolved list again could re-expand braces in file names
    log.warning("%d of %d shards are listed more than once; reading each once", len(urls) - len(unique), len(urls))
    return unique


def image_features(vit: VisionTransformer, images: Tensor, spec: FeatureSpec) -> Tensor:
    """(B, spec.dim(D)) features of a batch; with the default spec, the cls token of `backbone.encode`."""
    if spec.n_last_blocks > len(vit.blocks):
        raise ValueError(f"n_last_blocks {spec.n_last_blocks} exceeds the backbone's {len(vit.blocks)} blocks")
    if spec.pool == "cls" and not vit.has_class_token:  # its prefix tokens, if any, are registers
        raise ValueError("this backbone has no cls token; use pool=avg")
    # Each intermediate goes through the final norm, as DINO's get_intermediate_layers does.
    outs = vit.forward_intermediates(images, indices=spec.n_last_blocks, norm=True, output_fmt="NLC",
                                     intermediates_only=True, return_prefix_tokens=vit.num_prefix_tokens > 0,
                                     stop_early=True)
    split = [o if isinstance(o, tuple) else (o, None) for o in outs]  # (patches (B, L, D), prefix (B, P, D))
    parts = [prefix[:, 0] if spec.pool == "cls" else patches.mean(dim=1) for patches, prefix in split]
    if spec.avgpool:
        parts.append(split[-1][0].mean(dim=1))
    # global_pool="avg" ViTs (fine-tune exports with pool avg, timm's *_gap) norm after pooling, in fc_norm
    if isinstance(vit.norm, torch.nn.Identity) and not isinstance(vit.fc_norm, torch.nn.Identity):
        parts = [vit.fc_norm(p) for p in parts]
    return torch.cat(parts, dim=1)


@torch.no_grad()
def encode_shards(fn: Callable[[Tensor], Tensor], dim: int, shards: str | Sequence[str], accelerator: Accelerator,
                  *, img_size: int, batch_size: int, num_workers: int, crop_ratio: float, allow_pipe: bool,
                  desc: str | None = None) -> Features:
    """`fn` of every image of the shards (each read once, ranks reading their share) as (N, dim) rows, gathered
    and key-sorted on every rank (`gather_by_key`); a progress bar on the main process when given `desc`."""
    loader = eval_stream(distinct_shards(shards, allow_pipe), eval_transform(img_size, crop_ratio),
                         batch_size=batch_size, num_workers=num_workers, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, allow_pipe=allow_pipe)
    rows, labels, keys = [], [], []
    skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
    for batch in tqdm(loader, desc=desc, disable=desc is None or not accelerator.is_main_process, unit="batch"):
        skipped += batch["skipped"].sum(dim=0)
        if not batch["key"]:  # skip counts only, of a loader worker that found no usable sample
            continue
        with accelerator.autocast():
            rows.append(fn(batch["image"].to(accelerator.device, non_blocking=True)).float())
        labels.append(batch["label"].to(accelerator.device))
        keys += list(batch["key"])
    local_r = torch.cat(rows) if rows else torch.zeros(0, dim, device=accelerator.device)
    local_l = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=accelerator.device)
    return gather_by_key(accelerator, local_r, local_l, keys, skipped)


def extract_features(vit: VisionTransformer, shards: str | Sequence[str], accelerator: Accelerator, *,
                     spec: FeatureSpec = FeatureSpec(), batch_size: int = 256, num_workers: int = 4,  # noqa: B008 (frozen)
                     crop_ratio: float = 0.875, allow_pipe: bool = False, desc: str = "features",
                     cache_dir: str | Path | None = None) -> Features:
    """`encode_shards` of `image_features`, skips summed over ranks; with `cache_dir` stored there and loaded by a
    later call with the same inputs (`feature_cache`)."""
    path = None
    if cache_dir is not None:
        path = cache_path(cache_dir, vit, shards, asdict(spec), crop_ratio, accelerator.mixed_precision, allow_pipe)
        # a hit only if every rank sees the file (a cache dir not shared across nodes): all ranks take the same
        # branch, so none waits in a collective the others skip
        if all(gather_object([path.is_file()])):
            return Features(*load_cached(path))
    vit = vit.to(accelerator.device).eval()
    result = encode_shards(lambda images: image_features(vit, images, spec), spec.dim(vit.embed_dim), shards,
                           accelerator, img_size=vit.patch_embed.img_size[0], batch_size=batch_size,
                           num_workers=num_workers, crop_ratio=crop_ratio, allow_pipe=allow_pipe, desc=desc)
    if accelerator.is_main_process and sum(result.skipped.values()):
        log.warning("%s: %s of %d samples", desc, describe_skipped(result.skipped),
                    len(result.keys) + sum(result.skipped.values()))
    if path is not None:
        if accelerator.is_main_process:
            save_cached(path, result.features, result.labels, result.keys, result.skipped)
        accelerator.wait_for_everyone()
    return result


def gather_by_key(accelerator: Accelerator, rows: Tensor, labels: Tensor, keys: list[str],
                  skipped: Tensor) -> Features:
    """Rows of every rank on every rank, sorted by key, `skipped` counts summed (a collective: all ranks call).
    Rows sharing a key (samples of different shards) are ordered by label, then by their leading values."""
    all_r, all_l, all_k = rows, labels, keys
    if accelerator.num_processes > 1:
        # Ranks hold different counts: pad to the longest, gather, then cut each rank's padding away.
        counts = accelerator.gather(torch.tensor([rows.shape[0]], device=accelerator.device)).tolist()
        longest = max(counts)
        keep = torch.cat([torch.arange(r * longest, r * longest + n) for r, n in enumerate(counts)]).to(rows.device)
        all_r = accelerator.gather(accelerator.pad_across_processes(rows, dim=0))[keep]
        all_l = accelerator.gather(accelerator.pad_across_processes(labels, dim=0))[keep]
        all_k = gather_object(keys)
    repeated = {k for k, n in Counter(all_k).items() if n > 1}
    # Numeric and only the first values (one small transfer, only with repeated keys): rows of one image computed
    # on another rank differ in the last bits at most, and two images almost never tie on these.
    tie = list(zip(all_l.tolist(), all_r[:, :_TIE_VALUES].float().cpu().tolist(), strict=True)) if repeated else []
    order = sorted(range(len(all_k)), key=lambda i: (all_k[i], tie[i] if all_k[i] in repeated else ()))
    return Features(all_r[order].cpu(), all_l[order].cpu(), [all_k[i] for i in order],
                    skip_totals(accelerator, skipped))


def skip_totals(accelerator: Accelerator, skipped: Tensor) -> dict[str, int]:
    """This rank's (n_reasons,) skip counts summed over all ranks, by reason (a collective: all ranks call)."""
    total = accelerator.reduce(skipped.to(device=accelerator.device, dtype=torch.long), reduction="sum")
    return dict(zip(SKIP_REASONS, total.tolist(), strict=True))
