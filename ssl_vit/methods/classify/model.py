"""Fine-tuning as an objective, MAE's recipe: the backbone with a new head, timm's ImageNet training view,
mixup/cutmix soft targets, layer-wise lr decay."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import timm
import torch
from PIL import Image
from timm.data import Mixup, auto_augment, create_transform
from timm.data.auto_augment import RandAugment
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from ssl_vit.config.finetune import FTAugmentConfig, FTModelConfig
from ssl_vit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_vit.methods.base import Objective
from ssl_vit.methods.classify.layer_decay import param_groups_lrd
from ssl_vit.training.checkpoint import load_backbone


def build_classifier(cfg: FTModelConfig, num_classes: int) -> tuple[VisionTransformer, str, dict[str, Any]]:
    """The backbone's timm architecture with a `num_classes` head; returns (model, timm name, timm kwargs)."""
    if not cfg.backbone:
        raise ValueError("model.backbone: give the exported backbone (run dir or backbone.safetensors)")
    vit, meta = load_backbone(cfg.backbone, random_init=cfg.random_init)
    pool = "avg" if cfg.pool == "avg" else "token"
    kwargs = {**meta["model_kwargs"], "num_classes": num_classes, "global_pool": pool}
    model = timm.create_model(meta["model_name"], pretrained=False, drop_path_rate=cfg.drop_path_rate, **kwargs)
    state = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    expected_missing = {"head.weight", "head.bias"}
    if cfg.pool == "avg":  # MAE's global pool: the final norm moves after pooling, as a fresh fc_norm
        state = {k: v for k, v in state.items() if not k.startswith(("norm.", "fc_norm."))}
        expected_missing |= {"fc_norm.weight", "fc_norm.bias"}
    loaded = model.load_state_dict(state, strict=False)
    if set(loaded.missing_keys) != expected_missing or loaded.unexpected_keys:
        raise ValueError(f"{cfg.backbone}: cannot fine-tune it with pool={cfg.pool!r} (missing "
                         f"{sorted(set(loaded.missing_keys) - expected_missing)}, unexpected {loaded.unexpected_keys})")
    with torch.no_grad():
        torch.nn.init.normal_(model.head.weight, std=cfg.head_init_std)
        torch.nn.init.zeros_(model.head.bias)
    return model, meta["model_name"], kwargs


def train_transform(cfg: FTAugmentConfig, img_size: int) -> Any:
    """timm's ImageNet training transform: RandomResizedCrop (bicubic), flip, RandAugment, random erasing."""
    transform = create_transform(input_size=img_size, is_training=True, scale=cfg.crop_scale,
                                 color_jitter=cfg.color_jitter or None, auto_augment=cfg.auto_augment or None,
                                 interpolation="bicubic", re_prob=cfg.reprob, re_mode=cfg.remode,
                                 re_count=cfg.recount, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for step in getattr(transform, "transforms", ()):
        for op in step.ops if isinstance(step, RandAugment) else ():
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = posterize_any_bits  # this instance only; timm's op table stays as it is
    return transform


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize op, also for the 0 bits RandAugment draws at magnitude 10 (a black image, as Pillow < 13
    made it; Pillow 13 raises and would end the run)."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep)


def mixup_and_criterion(cfg: FTAugmentConfig, num_classes: int) -> tuple[Mixup | None, torch.nn.Module]:
    """Mixup/CutMix make soft targets (with smoothing folded in), else smoothed or plain cross-entropy."""
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                      num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return None, torch.nn.CrossEntropyLoss()


class Classify(Objective):
    """`backbone` is the whole classifier (head included): what is evaluated and exported."""

    def __init__(self, cfg: FTModelConfig, augment: FTAugmentConfig, num_classes: int, layer_decay: float) -> None:
        super().__init__()
        self.backbone, self.model_name, self.model_kwargs = build_classifier(cfg, num_classes)
        self.mixup, self.criterion = mixup_and_criterion(augment, num_classes)
        self.augment, self.layer_decay = augment, layer_decay

    @property
    def views(self) -> Callable[[Any], Tensor]:
        return train_transform(self.augment, self.backbone.patch_embed.img_size[0])

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        images, targets = batch["image"], batch["label"]  # (B, 3, H, W), (B,)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)  # mixed images, soft targets (B, num_classes)
        return {"loss": self.criterion(self.backbone(images), targets)}

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """MAE's layer-decay groups: each with an `lr_scale` the loop multiplies the scheduled lr by."""
        return param_groups_lrd(self.backbone, weight_decay, self.backbone.no_weight_decay(), self.layer_decay)
