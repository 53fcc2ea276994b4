"""DINO (Caron et al., 2021): self-distillation with no labels, between a student and its EMA teacher.

    crops = multi_crop(image)                                  # 2 global + N local views
    t = teacher(crops[:2])                                     # the teacher sees the global views only
    s = student(crops)                                         # the student sees them all
    loss = Σ_{t ≠ s} H(softmax((t - c) / τt), softmax(s / τs))   # centered, sharpened teacher as target
    c ← EMA of mean(t);  after the optimizer step: θt ← m·θt + (1 − m)·θs
    optionally + w_gram · L_Gram(student patches, frozen starting backbone's) of the global crops (gram.py)
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ssl_vit.config.methods import DINOConfig
from ssl_vit.config.pretrain import TrainConfig
from ssl_vit.data.device.augment import CheapView, DeviceAugment, cheap_size
from ssl_vit.data.transforms import denormalize, normalize
from ssl_vit.methods.base import Objective
from ssl_vit.methods.dino.gram import gram_loss
from ssl_vit.methods.dino.head import DINOHead
from ssl_vit.methods.dino.loss import center_stats, dino_loss, mean_entropy, teacher_targets, update_center
from ssl_vit.methods.dino.monitor import COLLAPSE_WINDOW, CollapseWatch
from ssl_vit.methods.dino.transforms import MultiCropViews, device_views
from ssl_vit.training.optim import cosine

N_GLOBAL = 2  # global crops: the teacher's inputs


def teacher_temperature(step: int, warmup_steps: int, start: float, end: float) -> float:
    """Linear warmup of the teacher temperature from `start` to `end` over `warmup_steps`, then constant."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


def teacher_momentum(step: int, total_steps: int, base: float) -> float:
    """EMA momentum of the teacher: half-cosine from `base` at step 0 to 1 at `total_steps`."""
    return cosine(step, total_steps, base, 1.0)


class DINO(Objective):
    """Student = shared backbone + DINOHead; teacher = their EMA copy, never optimised, always in eval mode.
    `total_steps`: the teacher-momentum cosine's length; `device_aug`: multi-crop batched in `forward`."""

    def __init__(self, cfg: DINOConfig, backbone: VisionTransformer,
                 total_steps: int = TrainConfig.total_steps, collapse_window: int = COLLAPSE_WINDOW,
                 device_aug: bool = False) -> None:
        super().__init__()
        self.cfg, self.total_steps = cfg, total_steps
        self.backbone = backbone
        if backbone.cls_token is not None:  # DINO's reference draws it like its other weights; timm's std is 1e-6
            nn.init.trunc_normal_(backbone.cls_token, std=0.02)
        self.head = DINOHead(backbone.embed_dim, cfg.out_dim, cfg.hidden_dim, cfg.bottleneck_dim,
                             cfg.head_layers, cfg.norm_last_layer, cfg.use_bn_in_head)
        # Same initial weights as the student; its drop-path is inert because it always stays in eval mode.
        teacher = nn.ModuleDict({"backbone": copy.deepcopy(backbone), "head": copy.deepcopy(self.head)})
        self.teacher = teacher.requires_grad_(False).eval()
        # Gram anchoring's teacher: the starting backbone, frozen (no EMA: it is no part of `teacher`); saved with
        # the model's state, never exported. None when off: no copy.
        frozen_start = copy.deepcopy(backbone).requires_grad_(False).eval() if cfg.gram_loss_weight > 0 else None
        self.gram_teacher: VisionTransformer | None = frozen_start
        self.register_buffer("center", torch.zeros(1, cfg.out_dim))  # persistent: checkpointed and resumed
        # The step's teacher-output sums and entropy, applied in `after_step` only: a skipped step must leave the
        # center alone, or one overflow poisons every later target.
        self._center_sums: Tensor | None = None
        self._entropy: tuple[Tensor, int] | None = None  # sum, micro-batches
        self.collapse = CollapseWatch(cfg.out_dim, collapse_window)
        self.device_aug = DeviceAugment(device_views(cfg, backbone.patch_embed.img_size[0])) if device_aug else None

    def train(self, mode: bool = True) -> DINO:
        super().train(mode)
        self.teacher.eval()  # model.train() must not switch on the teacher's drop-path
        if self.gram_teacher is not None:
            self.gram_teacher.eval()
        return self

    @property
    def views(self) -> Callable[[Image.Image], Tensor | list[Tensor]]:
        """The multi-crop, or with `device_aug` one resized square that `device_views` crops on the device."""
        size = self.backbone.patch_embed.img_size[0]
        return MultiCropViews(self.cfg, size) if self.device_aug is None else CheapView(cheap_size(size))

    def export_backbone(self) -> VisionTransformer:
        return self.teacher["backbone"] if self.cfg.export_teacher else self.backbone

    def crops(self, batch: dict[str, Any]) -> list[Tensor]:
        """The batch's multi-crop views, made here when the loader left them to the device."""
        images = batch["image"]
        if self.device_aug is not None:
            return self.device_aug(images)
        if not isinstance(images, (list, tuple)) or len(images) < N_GLOBAL:
            raise ValueError(f"{type(self).__name__} needs multi-crop batches: a list of at least 2 crop tensors "
                             "per batch")
        return [normalize(crop) for crop in images]

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        crops = self.crops(batch)
        temp = teacher_temperature(step, self.cfg.warmup_teacher_temp_steps, self.cfg.warmup_teacher_temp,
                                   self.cfg.teacher_temp)
        globals_ = torch.cat(list(crops[:N_GLOBAL]))  # (2B, 3, H, W): crop 1 of every image, then crop 2
        with torch.no_grad():
            teacher_out = self.teacher["head"](self.encode(self.teacher["backbone"], globals_)[:, 0])  # (2B, K)
            targets = teacher_targets(teacher_out, self.center, temp)  # (2B, K)
        runs = encode_runs(self.backbone, crops, self.encode)
        student_out = self.head(torch.cat([tokens[:, 0] for tokens in runs]))  # (V·B, K)
        loss = dino = dino_loss(student_out, targets, len(crops), self.cfg.student_temp)
        out: dict[str, Tensor] = {}
        if self.gram_teacher is not None:  # the global crops come first, in the first run
            gram = self.gram_anchor(globals_, runs[0][:globals_.shape[0], self.backbone.num_prefix_tokens:])
            loss = loss + self.cfg.gram_loss_weight * gram
            out = {"dino_loss": dino.detach(), "gram_loss": gram.detach()}

        entropy = mean_entropy(targets)
        if self.training:
            self._center_sums = add_sums(self._center_sums, center_stats(teacher_out))
            self._entropy = add_entropy(self._entropy, entropy)
        return {"loss": loss, **out, **self.monitors(step, temp, dino, entropy)}

    def monitors(self, step: int, temp: float, dino: Tensor, entropy: Tensor, **more: Tensor) -> dict[str, Tensor]:
        """The logged monitors of docs/dino.md; `more` goes after the center's norm."""
        momentum = teacher_momentum(step, self.total_steps, self.cfg.momentum_teacher)
        return {
            "teacher_entropy": entropy,
            # Each teacher view enters the same number of pairs, so the mean KL is the DINO loss minus the entropy.
            "kl": dino.detach() - entropy,
            "center_norm": self.center.norm(),
            **more,
            # torch.full launches a fill kernel; torch.tensor(x, device=...) would be a blocking copy every step
            "teacher_temp": torch.full((), temp, device=dino.device),
            "teacher_momentum": torch.full((), momentum, device=dino.device),
        }

    def gram_anchor(self, global_crops: Tensor, student_patches: Tensor) -> Tensor:
        """L_Gram of the student's patch features (2B, P, D) of the global crops (2B, 3, H, W) against the Gram
        teacher's of the same crops, unmasked."""
        with torch.no_grad():
            anchor = self.encode(self.gram_teacher, global_crops)[:, self.backbone.num_prefix_tokens:]  # (2B, P, D)
        return gram_loss(student_patches, anchor)

    def after_backward(self, step: int) -> None:
        super().after_backward(step)  # the backbone freeze
        # No gradient at all (rather than a zero one): AdamW then neither moves nor decays the frozen layers.
        if step < self.cfg.freeze_last_layer_steps:
            for head in self.modules():  # every head's (DINOv2's iBOT head too; the teacher's have none)
                if isinstance(head, DINOHead):
                    for param in head.last_layer.parameters():
                        param.grad = None

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if self._center_sums is not None:  # the official order: the center moves after the loss used it
            update_center(self.center, self._center_sums, self.cfg.center_momentum)
            self._center_sums = None
        m = teacher_momentum(step, self.total_steps, self.cfg.momentum_teacher)
        # every teacher part follows the student module of the same name (a subclass may add parts)
        student = [p for name in self.teacher for p in getattr(self, name).parameters()]
        teacher = [p for part in self.teacher.values() for p in part.parameters()]
        torch._foreach_lerp_(teacher, student, 1.0 - m)  # θt ← θt + (1 − m)(θs − θt) = m·θt + (1 − m)·θs
        self._watch_collapse(step)

    def after_skipped_step(self, step: int) -> None:
        self._center_sums = None
        self._watch_collapse(step)  # a skipped step's entropy counts too (a NaN one ends an episode)

    def _watch_collapse(self, step: int) -> None:
        if self._entropy is not None:  # the step's mean over its micro-batches
            self.collapse.update(self._entropy[0] / self._entropy[1], step)
            self._entropy = None

    def after_training(self) -> None:
        self.collapse.report()  # an episode that reached the window since the last periodic read

    @torch.no_grad()
    def visualize(self, batch: dict[str, Any], n: int = 8) -> dict[str, Tensor]:
        """The crops of a few images, a row per image: globals, then locals (upscaled to the global size)."""
        crops = self.crops(batch)
        size = crops[0].shape[-2:]
        upscaled = [F.interpolate(c[:n].float(), size=size, mode="nearest") for c in crops]  # V × (n,3,H,W)
        rows = [torch.cat([c[i] for c in upscaled], dim=-1) for i in range(upscaled[0].shape[0])]
        return {"dino/crops": denormalize(torch.cat(rows, dim=-2))}


def encode_runs(backbone: VisionTransformer, crops: list[Tensor], encoder: Callable[..., Tensor]) -> list[Tensor]:
    """Tokens (n·B, prefix + L, D) of each run of n equal-sized crops, in order: same-resolution crops share a pass."""
    return [encoder(backbone, torch.cat(list(group)))
            for _, group in itertools.groupby(crops, key=lambda c: tuple(c.shape[-2:]))]


def add_sums(total: Tensor | None, sums: Tensor) -> Tensor:
    """A micro-batch's center sums added to the step's."""
    return sums if total is None else total + sums


def add_entropy(pending: tuple[Tensor, int] | None, entropy: Tensor) -> tuple[Tensor, int]:
    """A micro-batch's entropy added to the step's (sum, micro-batches)."""
    total, count = pending or (0.0, 0)
    return entropy.detach() + total, count + 1
