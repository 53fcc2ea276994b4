"""DINOv2 (Oquab et al., 2023) on the shared backbone: DINO's student, EMA teacher and multi-crop, plus

    masks = sample_masks(2B global crops)                      # a share of them, ratios spread over a range
    t = teacher(globals)                                       # unmasked: cls and patch tokens
    s = student(globals with mask tokens at masks), student(locals)
    loss = dino(s_cls, SK(t_cls)) + w_ibot · ibot(s_patch[masks], SK(t_patch[masks])) + w_koleo · Σ_g koleo(s_cls_g)
           (+ w_gram · L_Gram(s_patch, frozen starting backbone's patches of the globals): dino/gram.py)
    after the optimizer step: θt ← m·θt + (1 − m)·θs           # every head included

SK is Sinkhorn-Knopp (or, with `centering: softmax`, DINO's centered softmax with one EMA center per loss).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ssl_vit.config.methods import DINOv2Config
from ssl_vit.config.pretrain import TrainConfig
from ssl_vit.methods.dino.head import DINOHead
from ssl_vit.methods.dino.loss import (
    center_stats,
    dino_loss,
    mean_entropy,
    sinkhorn_knopp,
    teacher_targets,
    update_center,
)
from ssl_vit.methods.dino.model import DINO, N_GLOBAL, add_entropy, add_sums, encode_runs, teacher_temperature
from ssl_vit.methods.dino.monitor import COLLAPSE_WINDOW, CollapseWatch
from ssl_vit.methods.dinov2.loss import ibot_loss, koleo_loss
from ssl_vit.methods.dinov2.masking import PatchMasks, sample_masks


class DINOv2(DINO):
    """DINO plus a learned mask token, an optional separate iBOT head (and its teacher copy), a patch-target center
    and a collapse watch over the patch targets. `cfg.ibot_loss_weight == 0` runs without masks (DINO + KoLeo)."""

    cfg: DINOv2Config

    def __init__(self, cfg: DINOv2Config, backbone: VisionTransformer,
                 total_steps: int = TrainConfig.total_steps, collapse_window: int = COLLAPSE_WINDOW,
                 device_aug: bool = False) -> None:
        super().__init__(cfg, backbone, total_steps, collapse_window, device_aug)
        # Only what the loss uses: DDP refuses parameters that get no gradient. DINOv2 starts the mask token at
        # zero; its name keeps it out of weight decay (base.py).
        ibot = cfg.ibot_loss_weight > 0
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim)) if ibot else None
        self.ibot_head: DINOHead | None = None
        patch_dim = cfg.out_dim
        if ibot and cfg.ibot_separate_head:
            self.ibot_head = DINOHead(backbone.embed_dim, cfg.ibot_out_dim, cfg.ibot_hidden_dim,
                                      cfg.ibot_bottleneck_dim, cfg.ibot_head_layers, cfg.norm_last_layer,
                                      cfg.use_bn_in_head)
            self.teacher["ibot_head"] = copy.deepcopy(self.ibot_head).requires_grad_(False).eval()
            patch_dim = cfg.ibot_out_dim
        self.register_buffer("patch_center", torch.zeros(1, patch_dim))  # softmax centering of the patch targets
        self._patch_sums: Tensor | None = None
        self._patch_entropy: tuple[Tensor, int] | None = None  # sum, micro-batches
        self.patch_collapse = CollapseWatch(patch_dim, collapse_window, watched="iBOT (patch targets)")

    def targets(self, teacher_out: Tensor, center: Tensor, temp: float) -> Tensor:
        """The teacher's centered, sharpened targets under `cfg.centering`."""
        if self.cfg.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(teacher_out, temp, self.cfg.sinkhorn_iterations)
        return teacher_targets(teacher_out, center, temp)

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        crops, cfg = self.crops(batch), self.cfg
        temp = teacher_temperature(step, cfg.warmup_teacher_temp_steps, cfg.warmup_teacher_temp, cfg.teacher_temp)
        globals_ = torch.cat(list(crops[:N_GLOBAL]))  # (2B, 3, H, W): crop 1 of every image, then crop 2
        n_img, n_prefix = globals_.shape[0], self.backbone.num_prefix_tokens
        with torch.no_grad():  # the teacher sees the unmasked crops
            t_tokens = self.encode(self.teacher["backbone"], globals_)  # (2B, prefix + L, D)
        masks = None
        if cfg.ibot_loss_weight > 0:  # on the CPU: the masked counts, hence every shape, known without a sync
            (ph, pw), (h, w) = self.backbone.patch_embed.patch_size, globals_.shape[-2:]
            grid = (h // ph, w // pw) if cfg.mask_shape == "block" else None  # the global crops' patch grid
            masks = sample_masks(n_img, t_tokens.shape[1] - n_prefix, cfg.mask_ratio_range,
                                 cfg.mask_sample_probability, grid=grid).to(globals_.device)
        with torch.no_grad():
            ibot_teacher = self.teacher["ibot_head"] if self.ibot_head is not None else None
            t_cls, t_patch = _heads(self.teacher["head"], ibot_teacher, t_tokens[:, 0], t_tokens[:, n_prefix:], masks)
            cls_targets = self.targets(t_cls, self.center, temp)  # (2B, K)
            patch_targets = None if t_patch is None else self.targets(t_patch, self.patch_center, temp)  # (M, K')

        s_tokens = self.encode(self.backbone, globals_, mask=None if masks is None else masks.mask,
                               mask_token=self.mask_token)  # (2B, prefix + L, D)
        s_global_cls = s_tokens[:, 0]
        local_cls = [tokens[:, 0] for tokens in encode_runs(self.backbone, crops[N_GLOBAL:], self.encode)]
        s_cls, s_patch = _heads(self.head, self.ibot_head, torch.cat([s_global_cls, *local_cls]),
                                s_tokens[:, n_prefix:], masks)
        dino = dino_loss(s_cls, cls_targets, len(crops), cfg.student_temp)
        loss, out = dino, {"dino_loss": dino.detach()}
        if cfg.koleo_loss_weight > 0:  # per global crop: two views of one image are no neighbours to spread
            koleo = sum(koleo_loss(c) for c in s_global_cls.chunk(N_GLOBAL))
            loss = loss + cfg.koleo_loss_weight * koleo
            out["koleo_loss"] = koleo.detach()
        if masks is not None:
            ibot = ibot_loss(s_patch, patch_targets, masks.weight, n_img, cfg.student_temp)
            loss = loss + cfg.ibot_loss_weight * ibot
            out["ibot_loss"] = ibot.detach()
        if self.gram_teacher is not None:  # the student's patches as the losses saw them, masked ones included
            gram = self.gram_anchor(globals_, s_tokens[:, n_prefix:])
            loss = loss + cfg.gram_loss_weight * gram
            out["gram_loss"] = gram.detach()

        entropy = mean_entropy(cls_targets)
        if self.training:
            self._accumulate(t_cls, t_patch, entropy, patch_targets)
        patch = {}
        if patch_targets is not None and patch_targets.shape[0]:
            patch = {"patch_entropy": mean_entropy(patch_targets), "patch_center_norm": self.patch_center.norm()}
        return {"loss": loss, **out, **self.monitors(step, temp, dino, entropy, **patch)}

    def _accumulate(self, t_cls: Tensor, t_patch: Tensor | None, entropy: Tensor,
                    patch_targets: Tensor | None) -> None:
        """What `after_step` applies: the centers' sums (softmax centering) and the entropies the watches read."""
        softmax = self.cfg.centering == "softmax"
        if softmax:
            self._center_sums = add_sums(self._center_sums, center_stats(t_cls))
        self._entropy = add_entropy(self._entropy, entropy)
        if t_patch is None or not t_patch.shape[0]:  # no masked patch this micro-batch
            return
        if softmax:
            self._patch_sums = add_sums(self._patch_sums, center_stats(t_patch))
        self._patch_entropy = add_entropy(self._patch_entropy, mean_entropy(patch_targets))

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        if self._patch_sums is not None:
            update_center(self.patch_center, self._patch_sums, self.cfg.center_momentum)
            self._patch_sums = None
        super().after_step(step)  # the cls center, the EMA of every teacher part, both watches

    def after_skipped_step(self, step: int) -> None:
        self._patch_sums = None
        super().after_skipped_step(step)

    def _watch_collapse(self, step: int) -> None:
        super()._watch_collapse(step)
        if self._patch_entropy is not None:
            self.patch_collapse.update(self._patch_entropy[0] / self._patch_entropy[1], step)
            self._patch_entropy = None

    def after_training(self) -> None:
        super().after_training()
        self.patch_collapse.report()


def _heads(head: DINOHead, ibot_head: DINOHead | None, cls: Tensor, patches: Tensor,
           masks: PatchMasks | None) -> tuple[Tensor, Tensor | None]:
    """(head(cls), the iBOT head on the masked patch tokens, or None without masks); one pass when it is shared."""
    if masks is None:
        return head(cls), None
    picked = patches.flatten(0, 1).index_select(0, masks.index)  # (M, D), row-major like `masks.index`
    if ibot_head is not None:
        return head(cls), ibot_head(picked)
    out = head(torch.cat([cls, picked]))
    return out[:cls.shape[0]], out[cls.shape[0]:]
