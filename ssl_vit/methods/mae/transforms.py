"""MAE's one training view: a random resized crop (bicubic) and a horizontal flip, no colour augmentation."""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image
from torch import Tensor

from ssl_vit.data.device.augment import CheapView, cheap_size
from ssl_vit.data.transforms import crop_flip


def mae_views(img_size: int, crop_scale: tuple[float, float],
              device_aug: bool = False) -> Callable[[Image.Image], Tensor]:
    """PIL image → uint8 (3, S, S). With `device_aug` the loader only resizes; the model crops and flips."""
    return CheapView(cheap_size(img_size)) if device_aug else crop_flip(img_size, crop_scale)
