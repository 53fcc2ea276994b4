"""Device-side augmentation (`data.device_aug`): the CPU decodes and makes one cheap square (`CheapView`), the
device crops, flips, jitters, blurs, solarizes and normalises it per view, batched (docs/data.md)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision.ops import roi_align
from torchvision.transforms import v2

from ssl_vit.data.transforms import BLUR_SIGMA, IMAGENET_MEAN, IMAGENET_STD, blur_kernel, device_constant

RATIO: tuple[float, float] = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range (torchvision's default)
JITTER: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
_TRIALS = 10  # crop draws per sample before falling back to the whole square (as torchvision does)
_LUMA = (0.299, 0.587, 0.114)
_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
_FROM_YIQ = tuple(tuple(row) for row in np.linalg.inv(np.array(_TO_YIQ)).tolist())


def cheap_size(img_size: int) -> int:
    """Side of the CPU-resized square the device crops from: the usual 224 → 256 eval-resize ratio."""
    return round(img_size / 0.875)


class CheapView:
    """CPU part: resize the short side to `size` (bilinear), centre-crop → uint8 (3, size, size). Takes a PIL
    image or a uint8 (3, H, W) tensor, and runs where that tensor is (device decode)."""

    takes_tensors = True  # the loader may decode JPEGs straight into tensors for it (`decode_on_host`)

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Image.Image | Tensor) -> Tensor:
        # v2's functional ops, not a v2.Compose: its per-transform dispatch cost ~50 µs of this view's ~300
        pixels = img if isinstance(img, Tensor) else v2.functional.pil_to_tensor(img)
        resized = v2.functional.resize(pixels, [self.size], antialias=True)
        return v2.functional.center_crop(resized, [self.size, self.size])


@dataclass(frozen=True)
class ViewSpec:
    """One augmented view: output side, crop area range and per-sample probabilities."""

    size: int
    scale: tuple[float, float]
    flip_prob: float = 0.5
    jitter_prob: float = 0.0
    gray_prob: float = 0.0
    blur_prob: float = 0.0
    solarize_prob: float = 0.0


@dataclass
class ViewParams:
    """Per-sample random parameters of N rows (one view, or a group of views); None: an effect no row gets."""

    boxes: Tensor  # (N, 4) crop x0, y0, x1, y1 as fractions of the source side
    flip: Tensor | None  # (N,) bool
    jitter: Tensor | None  # (N, 4) brightness, contrast, saturation factors and hue shift; identity where not applied
    jittered: Tensor | None  # (N,) bool
    gray: Tensor | None  # (N,) bool
    blur_sigma: Tensor | None  # (N,) σ in output pixels; 0 = no blur
    solarize: Tensor | None  # (N,) bool


def _bernoulli(probs: Sequence[float], n: int, device: torch.device, gen: torch.Generator | None) -> Tensor | None:
    """(k·n,) bool, True with probability probs[i] in rows i·n … (i+1)·n; None when every probability is 0."""
    if not any(probs):
        return None
    u = torch.rand(len(probs), n, device=device, generator=gen)
    p = probs[0] if len(set(probs)) == 1 else device_constant(tuple(probs), device)[:, None]
    return (u < p).view(-1)


def _uniform(lo: float, hi: float, shape: tuple[int, ...], device: torch.device,
             gen: torch.Generator | None) -> Tensor:
    return lo + (hi - lo) * torch.rand(shape, device=device, generator=gen)


def sample_crop_boxes(n: int, scale: tuple[float, float], ratio: tuple[float, float] = RATIO,
                      device: torch.device | None = None, generator: torch.Generator | None = None) -> Tensor:
    """(n, 4) RandomResizedCrop boxes on a unit square: area ∈ scale, aspect ∈ ratio (log-uniform), else whole."""
    device = device or torch.device("cpu")
    area = _uniform(scale[0], scale[1], (n, _TRIALS), device, generator)
    r = _uniform(math.log(ratio[0]), math.log(ratio[1]), (n, _TRIALS), device, generator).exp()
    w, h = (area * r).sqrt(), (area / r).sqrt()
    ok = (w <= 1) & (h <= 1)
    first = ok.float().argmax(dim=1, keepdim=True)  # first trial that fits (0 if none does)
    wh = torch.cat([w.gather(1, first), h.gather(1, first)], dim=1)  # (n, 2)
    wh = torch.where(ok.any(dim=1, keepdim=True), wh, 1.0)  # no trial fits: the whole square
    xy0 = torch.rand(n, 2, device=device, generator=generator) * (1 - wh)
    return torch.cat([xy0, xy0 + wh], dim=1)


def sample_group_params(specs: Sequence[ViewSpec], n: int, device: torch.device | None = None,
                        generator: torch.Generator | None = None) -> ViewParams:
    """Every random choice of k views sharing a crop scale for `n` images each: k·n rows, view i in rows i·n …"""
    if len({tuple(s.scale) for s in specs}) != 1:
        raise ValueError(f"a group of views shares one crop scale, got {[s.scale for s in specs]}")
    device = device or torch.device("cpu")
    rows = len(specs) * n
    jittered, jitter = _bernoulli([s.jitter_prob for s in specs], n, device, generator), None
    if jittered is not None:  # factors 1 ± JITTER (hue: ± its shift), the identity (1, 1, 1, 0) where not jittered
        lo = device_constant(tuple(1 - j for j in JITTER[:3]) + (-JITTER[3],), device)
        factors = torch.addcmul(lo, torch.rand(rows, 4, device=device, generator=generator),
                                device_constant(tuple(2 * j for j in JITTER), device))
        jitter = torch.where(jittered[:, None], factors, device_constant((1.0, 1.0, 1.0, 0.0), device))
    blurred, blur_sigma = _bernoulli([s.blur_prob for s in specs], n, device, generator), None
    if blurred is not None:
        blur_sigma = torch.where(blurred, _uniform(*BLUR_SIGMA, (rows,), device, generator), 0.0)
    return ViewParams(
        boxes=sample_crop_boxes(rows, specs[0].scale, device=device, generator=generator),
        flip=_bernoulli([s.flip_prob for s in specs], n, device, generator),
        jitter=jitter,
        jittered=jittered,
        gray=_bernoulli([s.gray_prob for s in specs], n, device, generator),
        blur_sigma=blur_sigma,
        solarize=_bernoulli([s.solarize_prob for s in specs], n, device, generator),
    )


def _gray(x: Tensor) -> Tensor:
    w = device_constant(_LUMA, x.device, x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)  # (N, 1, H, W)


def colour_jitter(x: Tensor, factors: Tensor) -> Tensor:
    """Per-sample brightness, contrast, saturation (multiplicative) and hue shift (a rotation of YIQ's chroma plane
    by 2π·shift, shift in [-0.5, 0.5] of a turn) on images in [0, 1]."""
    f = factors[:, :, None, None, None]  # (N, 4, 1, 1, 1)
    x = (x * f[:, 0]).clamp(0, 1)
    mean = _gray(x).mean(dim=(2, 3), keepdim=True)
    x = ((x - mean) * f[:, 1] + mean).clamp(0, 1)
    gray = _gray(x)
    x = ((x - gray) * f[:, 2] + gray).clamp(0, 1)
    theta = 2 * math.pi * factors[:, 3]
    cos, sin, one, zero = theta.cos(), theta.sin(), torch.ones_like(theta), torch.zeros_like(theta)
    rot = torch.stack([torch.stack([one, zero, zero], 1), torch.stack([zero, cos, -sin], 1),
                       torch.stack([zero, sin, cos], 1)], 1)  # (N, 3, 3)
    m = device_constant(_FROM_YIQ, x.device, x.dtype) @ rot @ device_constant(_TO_YIQ, x.device, x.dtype)
    return torch.einsum("nij,njhw->nihw", m, x).clamp(0, 1)  # m: RGB → hue-rotated RGB


def gaussian_blur(x: Tensor, sigma: Tensor, kernel: int) -> Tensor:
    """Separable Gaussian blur with a per-sample σ (N,), reflect padding, one grouped conv per axis."""
    n, c, h, w = x.shape
    r = torch.arange(kernel, device=x.device, dtype=x.dtype) - kernel // 2
    k = torch.exp(-(r[None] ** 2) / (2 * sigma[:, None].to(x.dtype) ** 2))
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N·C, kernel)
    y = F.pad(x.reshape(1, n * c, h, w), (kernel // 2,) * 4, mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def augment_view(src: Tensor, params: ViewParams, size: int) -> Tensor:
    """src float (B, 3, S, S) in [0, 1] → normalised (N, 3, size, size); row r is cropped from image r mod B."""
    b, side = src.shape[0], src.shape[-1]
    n = params.boxes.shape[0]
    if n % b:
        raise ValueError(f"{n} rows of view parameters for a batch of {b} images: need a multiple of {b}")
    idx = torch.arange(b, device=src.device, dtype=src.dtype).repeat(n // b)[:, None]
    rois = torch.cat([idx, params.boxes.to(src.dtype) * side], dim=1)  # (N, 5) in pixels
    # sampling_ratio=-1: more samples per output pixel for bigger boxes, an area average (anti-aliasing)
    x = roi_align(src, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    # every effect runs on every row and `where` keeps it per sample: no data-dependent shapes, no host sync
    if params.flip is not None:
        x = torch.where(params.flip[:, None, None, None], x.flip(-1), x)
    if params.jittered is not None and params.jitter is not None:
        x = torch.where(params.jittered[:, None, None, None], colour_jitter(x, params.jitter.to(x.dtype)), x)
    if params.gray is not None:
        x = torch.where(params.gray[:, None, None, None], _gray(x).expand_as(x), x)
    if params.blur_sigma is not None:
        blurred = gaussian_blur(x, params.blur_sigma.clamp_min(BLUR_SIGMA[0]), blur_kernel(size))
        x = torch.where((params.blur_sigma > 0)[:, None, None, None], blurred, x)
    if params.solarize is not None:
        x = torch.where(params.solarize[:, None, None, None] & (x >= 128 / 255), 1 - x, x)
    mean = device_constant(IMAGENET_MEAN, x.device, x.dtype).view(1, 3, 1, 1)
    std = device_constant(IMAGENET_STD, x.device, x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


class DeviceAugment:
    """uint8 (B, 3, S, S) on any device → one normalised float (B, 3, s, s) tensor per `ViewSpec`, in spec order."""

    def __init__(self, specs: Sequence[ViewSpec]) -> None:
        if not specs:
            raise ValueError("DeviceAugment needs at least one view")
        self.specs = list(specs)
        # views of one size and crop scale are augmented as one batch of k·B rows: fewer kernel launches
        groups: dict[tuple[int, tuple[float, ...]], list[int]] = {}
        for i, spec in enumerate(self.specs):
            groups.setdefault((spec.size, tuple(spec.scale)), []).append(i)
        self.groups = list(groups.values())

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> list[Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"device augmentation takes uint8 (B, 3, S, S) images, got {images.dtype} "
                             f"{tuple(images.shape)}")
        with torch.autocast(images.device.type, enabled=False):
            src = images.to(torch.float32, memory_format=torch.contiguous_format) / 255  # see transforms.normalize
            b = src.shape[0]
            views: dict[int, Tensor] = {}
            for group in self.groups:
                specs = [self.specs[i] for i in group]
                x = augment_view(src, sample_group_params(specs, b, src.device, generator), specs[0].size)
                views.update(zip(group, x.split(b), strict=True))  # (k·B, …) → k views of B, no copy
            return [views[i] for i in range(len(self.specs))]
