"""Image views (torchvision v2 on PIL): pretraining views end in uint8 (normalised on the device), eval in float."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms import v2

_BICUBIC = v2.InterpolationMode.BICUBIC

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
BLUR_SIGMA: tuple[float, float] = (0.1, 2.0)  # Gaussian blur σ in pixels of the resized crop, drawn uniformly


def blur_kernel(size: int) -> int:
    """Gaussian kernel side for a crop of `size`: ±3σ at the largest σ, odd and within the crop."""
    kernel = 2 * math.ceil(3 * BLUR_SIGMA[1]) + 1
    return min(kernel, size if size % 2 else size - 1)


@functools.lru_cache(maxsize=64)
def device_constant(values: tuple, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`torch.tensor(values)` on `device`, cached: no blocking host-to-device copy per step. Read-only."""
    return torch.tensor(values, device=device, dtype=dtype)


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 images (…, 3, H, W) → ImageNet-normalised float32; floating images are returned unchanged."""
    if images.is_floating_point():
        return images
    mean = device_constant(tuple(255 * m for m in IMAGENET_MEAN), images.device).view(3, 1, 1)
    std = device_constant(tuple(255 * s for s in IMAGENET_STD), images.device).view(3, 1, 1)
    # contiguous for the model: the float conversion is a full pass anyway, so it lays out strided crops for free
    return images.to(torch.float32, memory_format=torch.contiguous_format).sub_(mean).div_(std)


def crop_flip(img_size: int, scale: tuple[float, float]) -> Callable[[Image.Image], torch.Tensor]:
    """Random resized crop (bicubic) and horizontal flip → uint8 (3, S, S), e.g. a pretraining or probe view."""
    return v2.Compose([
        # crop on the PIL image, as the papers' code does, so only the crop is ever resized
        v2.RandomResizedCrop(img_size, scale=scale, interpolation=_BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.functional.pil_to_tensor,  # one call: v2.ToImage + v2.ToPureTensor cost two dispatches per view
    ])


def eval_transform(img_size: int, crop_ratio: float = 0.875) -> Callable[[Image.Image], torch.Tensor]:
    """Resize the short side to round(img_size / crop_ratio) (bicubic), centre-crop img_size, normalise."""
    if not 0.0 < crop_ratio <= 1.0:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
    return v2.Compose([
        v2.Resize(round(img_size / crop_ratio), interpolation=_BICUBIC, antialias=True),
        v2.CenterCrop(img_size),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        v2.ToPureTensor(),  # a plain Tensor, not a tv_tensors.Image subclass
    ])


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalisation of (3, H, W) or (B, 3, H, W) images, clamped to [0, 1] for display."""
    mean = device_constant(IMAGENET_MEAN, x.device, x.dtype).view(3, 1, 1)
    std = device_constant(IMAGENET_STD, x.device, x.dtype).view(3, 1, 1)
    return (x * std + mean).clamp(0.0, 1.0)
