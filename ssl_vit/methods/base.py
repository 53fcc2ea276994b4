"""`Objective`: all the training loop knows about a method. A new method subclasses it in its own folder."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ssl_vit.methods.classify.layer_decay import param_groups_lrd
from ssl_vit.models.backbone import encode

# Learned tokens and embeddings are never decayed, as in timm (the papers decay them: docs/design.md).
_NO_DECAY_SUFFIXES = ("cls_token", "reg_token", "dist_token", "mask_token", "pos_embed")


class Objective(nn.Module):
    """A pretext task over a shared timm ViT `backbone`. `forward(batch, step)` returns the scalar `loss` and any
    scalars to log; the hooks act around the optimizer step (EMA teachers, gradient freezes)."""

    backbone: VisionTransformer
    # Accelerate 1.1's FSDP `prepare` reads this Transformers attribute without a default: none tied here.
    _tied_weights_keys: list[str] | None = None
    # Optimizer steps in which only the method's own parts train (`train.freeze_backbone_steps`, set with the
    # optimizer: training/optim.py); `after_backward` enforces it.
    freeze_backbone_steps: int = 0
    # Every encoder call of an objective goes through this, so `compile_encoder` can swap in a compiled one.
    encode: Callable[..., Tensor] = staticmethod(encode)

    def compile_encoder(self) -> None:
        """Run the encoder calls through `torch.compile`, static shapes: one graph per crop size and mask ratio."""
        self.encode = torch.compile(encode, dynamic=False)

    @property
    def views(self) -> Callable[[Any], Any]:
        """Per-image training augmentation: PIL image → tensor, or list of tensors for multi-crop."""
        raise NotImplementedError

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def after_backward(self, step: int) -> None:
        """Called after gradients are complete and before the optimizer step (e.g. to drop frozen grads); an
        override calls this one, which freezes the backbone for the first `freeze_backbone_steps` steps."""
        # No gradient at all (rather than a zero one): AdamW then neither moves nor decays the backbone, and its
        # moments start at the first step that trains it.
        if step < self.freeze_backbone_steps:
            for param in self.backbone.parameters():
                param.grad = None

    def after_step(self, step: int) -> None:
        """Called after every optimizer step (e.g. to update an EMA teacher)."""

    def after_skipped_step(self, step: int) -> None:
        """Called instead of `after_step` when a NaN/inf skips the update: drop what the forward passes left."""

    def after_training(self) -> None:
        """Called once when the loop ends (last step, stop signal or abort): report what is still pending."""

    def export_backbone(self) -> VisionTransformer:
        """The backbone a user takes away: the one to export and evaluate."""
        return self.backbone

    def visualize(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Named (3, H, W) images in [0, 1] for TensorBoard; none by default."""
        return {}

    def param_groups(self, weight_decay: float, backbone_lr_scale: float = 1.0,
                     layer_decay: float = 1.0) -> list[dict[str, Any]]:
        """AdamW groups: decay on weight matrices only, none on 1-D params (norms, biases) and tokens. The backbone's
        groups carry an `lr_scale` (the loop multiplies the lr by it): `backbone_lr_scale` × MAE's layer decay
        (classify/layer_decay.py); at 1 and 1, just the two groups over every parameter."""
        def split(params: list[tuple[str, nn.Parameter]]) -> list[dict[str, Any]]:
            no_decay = [p for n, p in params if p.ndim <= 1 or n.endswith(_NO_DECAY_SUFFIXES)]
            decay = [p for n, p in params if not (p.ndim <= 1 or n.endswith(_NO_DECAY_SUFFIXES))]
            return [{"params": decay, "weight_decay": weight_decay, "apply_wd": True},
                    {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]

        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if backbone_lr_scale == 1.0 and layer_decay == 1.0:
            return split(params)
        # the same no-decay rule for the backbone, in its own names
        no_decay = [n for n, p in self.backbone.named_parameters() if p.ndim == 0 or n.endswith(_NO_DECAY_SUFFIXES)]
        backbone = param_groups_lrd(self.backbone, weight_decay, no_decay, layer_decay)
        for group in backbone:
            group["lr_scale"] *= backbone_lr_scale
            del group["param_names"]  # torch takes names in every group or in none
        return split([(n, p) for n, p in params if not n.startswith("backbone.")]) + backbone
