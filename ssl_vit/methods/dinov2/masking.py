"""iBOT's masks for DINOv2: a share of the global crops is masked, each at its own ratio, the ratios spread evenly
over a range (DINOv2's collate: one stratum of the range per masked crop), the crops that get them shuffled; the
patches of a crop are random ones, or BEiT's rectangular blocks as DINOv2 draws them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PatchMasks:
    """`mask` (N, L) bool: the patches the student sees as the mask token; `index` (M,) the flat positions
    (n·L + l) of its M True entries in row-major order; `weight` (M,): 1 / (masked patches of that token's crop)."""

    mask: Tensor
    index: Tensor
    weight: Tensor

    def to(self, device: torch.device) -> PatchMasks:
        return PatchMasks(*(t.to(device, non_blocking=True) for t in (self.mask, self.index, self.weight)))


def sample_masks(n_images: int, n_patches: int, ratio_range: tuple[float, float], probability: float,
                 generator: torch.Generator | None = None, grid: tuple[int, int] | None = None) -> PatchMasks:
    """Masks for `n_images` crops of `n_patches` each, drawn on the CPU (the counts, and with them every shape,
    are then known without reading the device). int(`probability`·N) crops are masked; the i-th of them hides
    int(L·r) random patches (at least one), r uniform in the i-th of that many equal slices of `ratio_range`.
    With the crops' patch `grid`, the patches come in blocks (`block_mask`), which may hide fewer."""
    n_masked = int(n_images * probability)
    bounds = torch.linspace(ratio_range[0], ratio_range[1], n_masked + 1, dtype=torch.float64)
    ratios = bounds[:-1] + (bounds[1:] - bounds[:-1]) * torch.rand(n_masked, generator=generator, dtype=torch.float64)
    counts = torch.zeros(n_images, dtype=torch.long)
    counts[:n_masked] = (ratios * n_patches).long().clamp(1, n_patches)  # int(L·r), as DINOv2's collate
    counts = counts[torch.randperm(n_images, generator=generator)]  # which crops are masked: any of them
    ranks = torch.rand(n_images, n_patches, generator=generator).argsort(dim=1).argsort(dim=1)  # random order
    mask = ranks < counts.unsqueeze(1)  # (N, L): each crop's first `count` patches in its random order
    if grid is not None:  # DINOv2's cap on the patches a crop hides in blocks: half the grid
        blocks = torch.stack([block_mask(grid, int(c), n_patches // 2, generator).flatten() for c in counts])
        mask = torch.where(blocks.any(dim=1, keepdim=True), blocks, ranks < counts.clamp(max=1).unsqueeze(1))
        counts = mask.sum(dim=1)  # a crop whose blocks never fit keeps one random patch, as above
    index = mask.flatten().nonzero().squeeze(1)
    weight = (1.0 / counts.clamp(min=1).float()).repeat_interleave(counts)  # row-major: crop by crop
    return PatchMasks(mask, index, weight)


def block_mask(grid: tuple[int, int], count: int, max_hidden: int, generator: torch.Generator | None = None,
               min_block: int = 4, max_aspect: float = 1 / 0.3) -> Tensor:
    """BEiT's blockwise masking, as DINOv2's MaskingGenerator draws it: (h, w) bool with up to `count` (and at
    most `max_hidden`) patches hidden. Rectangles of `min_block` patches or more, aspect ratio log-uniform in
    [1 / max_aspect, max_aspect], are added while they hide new patches; 10 failed tries in a row end it."""
    height, width = grid
    mask = torch.zeros(height, width, dtype=torch.bool)
    hidden, log_aspect = 0, math.log(max_aspect)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * torch.rand((), generator=generator, dtype=torch.float64).item()

    while hidden < count:
        room = min(count - hidden, max_hidden)
        added = 0
        for _ in range(10):
            area, aspect = uniform(min_block, room), math.exp(uniform(-log_aspect, log_aspect))
            h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if h >= height or w >= width:  # DINOv2 leaves a row and a column free of any one block
                continue
            top = int(torch.randint(height - h + 1, (), generator=generator))
            left = int(torch.randint(width - w + 1, (), generator=generator))
            block = mask[top:top + h, left:left + w]
            added = h * w - int(block.sum())
            if 0 < added <= room:
                block.fill_(True)
                break
            added = 0
        if not added:
            break
        hidden += added
    return mask
