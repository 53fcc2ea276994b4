"""iBOT's masks for DINOv2: a share of the global crops is masked, each at its own ratio, the ratios spread evenly
over a range (DINOv2's collate: one stratum of the range per masked crop), the crops that get them shuffled."""

from __future__ import annotations

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
                 generator: torch.Generator | None = None) -> PatchMasks:
    """Masks for `n_images` crops of `n_patches` each, drawn on the CPU (the counts, and with them every shape,
    are then known without reading the device). int(`probability`·N) crops are masked; the i-th of them hides
    int(L·r) random patches (at least one), r uniform in the i-th of that many equal slices of `ratio_range`."""
    n_masked = int(n_images * probability)
    bounds = torch.linspace(ratio_range[0], ratio_range[1], n_masked + 1, dtype=torch.float64)
    ratios = bounds[:-1] + (bounds[1:] - bounds[:-1]) * torch.rand(n_masked, generator=generator, dtype=torch.float64)
    counts = torch.zeros(n_images, dtype=torch.long)
    counts[:n_masked] = (ratios * n_patches).long().clamp(1, n_patches)  # int(L·r), as DINOv2's collate
    counts = counts[torch.randperm(n_images, generator=generator)]  # which crops are masked: any of them
    ranks = torch.rand(n_images, n_patches, generator=generator).argsort(dim=1).argsort(dim=1)  # random order
    mask = ranks < counts.unsqueeze(1)  # (N, L): each crop's first `count` patches in its random order
    index = mask.flatten().nonzero().squeeze(1)
    weight = (1.0 / counts.clamp(min=1).float()).repeat_interleave(counts)  # row-major: crop by crop
    return PatchMasks(mask, index, weight)
