"""DINO's multi-crop (torchvision v2 on the PIL image): two global crops for the teacher, N local ones for the
student only; blur and solarization differ per view so the globals are asymmetric (paper, Appendix D)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms import v2

from ssl_vit.config.methods import DINOConfig
from ssl_vit.data.device.augment import ViewSpec
from ssl_vit.data.transforms import BLUR_SIGMA, blur_kernel


def dino_view(size: int, scale: tuple[float, float], color_jitter_prob: float, grayscale_prob: float,
              blur_prob: float, solarize_prob: float = 0.0) -> v2.Compose:
    """One view: PIL image → uint8 (3, size, size) tensor (normalised on the device)."""
    steps: list[Callable] = [
        v2.RandomResizedCrop(size, scale=scale, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)],
                       p=color_jitter_prob),
        v2.RandomGrayscale(p=grayscale_prob),
        v2.RandomApply([v2.GaussianBlur(blur_kernel(size), sigma=BLUR_SIGMA)], p=blur_prob),
    ]
    if solarize_prob > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=solarize_prob))  # on the 8-bit image: 128 = mid-grey
    return v2.Compose([*steps, v2.functional.pil_to_tensor])  # a plain uint8 tensor, one call (see crop_flip)


class MultiCropViews:
    """PIL image → [global 1, global 2, local 1, ..., local N] uint8 tensors (globals first)."""

    def __init__(self, cfg: DINOConfig, global_size: int) -> None:
        colour, blur = (cfg.color_jitter_prob, cfg.grayscale_prob), cfg.blur_probs
        self.global1 = dino_view(global_size, cfg.global_crops_scale, *colour, blur[0])
        self.global2 = dino_view(global_size, cfg.global_crops_scale, *colour, blur[1], cfg.solarize_prob)
        self.local = dino_view(cfg.local_crops_size, cfg.local_crops_scale, *colour, blur[2])
        self.local_number = cfg.local_crops_number

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        locals_ = [self.local(image) for _ in range(self.local_number)]
        return [self.global1(image), self.global2(image), *locals_]


def device_views(cfg: DINOConfig, global_size: int) -> list[ViewSpec]:
    """The multi-crop of `MultiCropViews` as device-side view specs: 2 global views, then the locals."""
    colour = {"jitter_prob": cfg.color_jitter_prob, "gray_prob": cfg.grayscale_prob}
    return [ViewSpec(global_size, cfg.global_crops_scale, blur_prob=cfg.blur_probs[0], **colour),
            ViewSpec(global_size, cfg.global_crops_scale, blur_prob=cfg.blur_probs[1],
                     solarize_prob=cfg.solarize_prob, **colour),
            *[ViewSpec(cfg.local_crops_size, cfg.local_crops_scale, blur_prob=cfg.blur_probs[2], **colour)
              for _ in range(cfg.local_crops_number)]]
