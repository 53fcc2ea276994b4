"""Masked Autoencoders (He et al., 2022): hide most patches, encode the rest, reconstruct the pixels.

    keep, mask, restore = random_masking(...)         # per-sample random subset of patches
    latent = encode(backbone, images, keep)           # encoder sees visible patches only
    pred = decoder(latent, restore)                   # light decoder fills in mask tokens
    loss = masked_mse(pred, pixel_target(patchify(images)), mask)  # MSE on the hidden patches only
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

from ssl_vit.config.methods import MAEConfig
from ssl_vit.data.device.augment import DeviceAugment, ViewSpec
from ssl_vit.data.transforms import denormalize, normalize
from ssl_vit.methods.base import Objective
from ssl_vit.methods.mae.loss import masked_mse, pixel_target
from ssl_vit.methods.mae.transforms import mae_views


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int]) -> Tensor:
    """Fixed 2-D sin-cos position embedding (L, dim), tokens row-major; column in the first half of the channels,
    row in the second, MAE's layout so its released weights line up (timm's differs: docs/design.md)."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )
    freqs = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))

    def embed_1d(pos: Tensor) -> Tensor:
        angles = pos.reshape(-1, 1) * freqs  # (L, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (L, dim/2)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()  # (L, dim)


def prefixed_sincos(dim: int, grid: tuple[int, int], n_prefix: int) -> Tensor:
    """(1, n_prefix + L, dim): zeros for the prefix tokens, then `sincos_pos_embed_2d`."""
    return torch.cat([torch.zeros(n_prefix, dim), sincos_pos_embed_2d(dim, grid)]).unsqueeze(0)


def random_masking(batch: int, length: int, mask_ratio: float, device: torch.device | None = None,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-sample random masking by sorting noise: `keep_idx` (B, K) patches the encoder sees, `mask` (B, L)
    1 = hidden, `restore` (B, L) such that `shuffled.gather(1, restore)` puts tokens back in patch order."""
    n_keep = int(length * (1 - mask_ratio))
    noise = torch.rand(batch, length, device=device, generator=generator)  # (B, L)
    shuffle = noise.argsort(dim=1)  # ascending noise: the first n_keep are kept
    restore = shuffle.argsort(dim=1)
    mask = (restore >= n_keep).float()  # (B, L) in patch order: a patch's rank in the noise order
    return shuffle[:, :n_keep], mask, restore


def patchify(images: Tensor, p: int) -> Tensor:
    """(B, 3, H, W) → (B, L, p·p·3), patches in row-major order, pixels (row, col, channel) within a patch."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, p: int, grid: tuple[int, int]) -> Tensor:
    """Inverse of `patchify`: (B, L, p·p·3) → (B, 3, H, W)."""
    b = patches.shape[0]
    x = patches.reshape(b, grid[0], grid[1], p, p, -1)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(b, -1, grid[0] * p, grid[1] * p)


class MAEDecoder(nn.Module):
    """Narrow transformer that reconstructs every patch from the visible tokens plus a shared mask token."""

    def __init__(self, embed_dim: int, grid: tuple[int, int], patch: int, n_prefix: int,
                 dim: int = 512, depth: int = 8, heads: int = 16) -> None:
        super().__init__()
        self.n_prefix = n_prefix
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", prefixed_sincos(dim, grid, n_prefix), persistent=False)  # fixed
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)
                                      for _ in range(depth)])
        self.norm = norm(dim)
        self.pred = nn.Linear(dim, patch * patch * 3)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: Tensor, restore: Tensor) -> Tensor:
        x = self.embed(latent)  # (B, prefix + K, dim)
        b, length = restore.shape
        prefix, visible = x[:, :self.n_prefix], x[:, self.n_prefix:]
        masked = self.mask_token.expand(b, length - visible.shape[1], -1)
        tokens = torch.cat([visible, masked], dim=1)  # (B, L, dim) in shuffled order
        tokens = tokens.gather(1, restore.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))  # patch order
        x = torch.cat([prefix, tokens], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.pred(x[:, self.n_prefix:])  # (B, L, p·p·3)


def _init_like_mae(module: nn.Module) -> None:
    """MAE's init: Xavier-uniform linears, zero biases; LayerNorms keep the ones and zeros they were built with."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class MAE(Objective):
    """`device_aug`: the loader only resizes (uint8); crop and flip run batched at the start of `forward`."""

    def __init__(self, cfg: MAEConfig, backbone: VisionTransformer, device_aug: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        size = backbone.patch_embed.img_size[0]
        self.device_aug = DeviceAugment([ViewSpec(size, cfg.crop_scale)]) if device_aug else None
        self.backbone = backbone
        self.patch = backbone.patch_embed.patch_size[0]
        self.grid = tuple(backbone.patch_embed.grid_size)
        # MAE's encoder position embedding is fixed sin-cos (zero for the cls and register tokens), not learned;
        # timm's no_embed_class models (its *_reg* ViTs) give the prefix tokens no position entry at all.
        n_positioned = 0 if backbone.no_embed_class else backbone.num_prefix_tokens
        with torch.no_grad():
            backbone.pos_embed.copy_(prefixed_sincos(backbone.embed_dim, self.grid, n_positioned))
        backbone.pos_embed.requires_grad_(False)
        self.decoder = MAEDecoder(backbone.embed_dim, self.grid, self.patch, backbone.num_prefix_tokens,
                                  cfg.decoder_dim, cfg.decoder_depth, cfg.decoder_heads)
        for part in (backbone.blocks, backbone.norm, self.decoder):
            part.apply(_init_like_mae)
        proj = backbone.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.view(proj.shape[0], -1))
        nn.init.normal_(backbone.cls_token, std=0.02)

    @property
    def views(self) -> Callable[[Any], Tensor]:
        return mae_views(self.backbone.patch_embed.img_size[0], self.cfg.crop_scale, self.device_aug is not None)

    def reconstruct(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Prediction (B, L, p·p·3) in target space, target (B, L, p·p·3) and mask (B, L)."""
        keep_idx, mask, restore = random_masking(images.shape[0], self.grid[0] * self.grid[1],
                                                 self.cfg.mask_ratio, images.device)
        latent = self.encode(self.backbone, images, keep_idx)  # (B, prefix + K, D)
        pred = self.decoder(latent, restore)  # (B, L, p·p·3)
        target = pixel_target(patchify(images, self.patch), self.cfg.norm_pix_loss)
        return pred, target, mask

    def images(self, batch: dict[str, Any]) -> Tensor:
        """The batch's training view (B, 3, S, S), augmented here when the loader left it to the device."""
        images = batch["image"]
        return normalize(images) if self.device_aug is None else self.device_aug(images)[0]

    def forward(self, batch: dict[str, Any], step: int) -> dict[str, Tensor]:
        pred, target, mask = self.reconstruct(self.images(batch))
        return {"loss": masked_mse(pred.float(), target.float(), mask)}

    @torch.no_grad()
    def visualize(self, batch: dict[str, Any], n: int = 8) -> dict[str, Tensor]:
        """(3, 3·H, n·W) image in [0, 1], one column per image: rows original, masked input, reconstruction with
        the visible patches pasted back."""
        images = self.images({"image": batch["image"][:n]})
        pred, _, mask = self.reconstruct(images)
        pred, patches = pred.float(), patchify(images.float(), self.patch)
        if self.cfg.norm_pix_loss:  # predictions live in per-patch normalised space: back with each patch's stats
            mean = patches.mean(dim=-1, keepdim=True)
            std = (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
            pred = pred * std + mean
        m = mask.unsqueeze(-1)  # (B, L, 1), 1 = hidden
        visible = unpatchify((1 - m).expand_as(patches), self.patch, self.grid)  # (B, 3, H, W) of 0/1
        pasted = unpatchify(patches * (1 - m) + pred * m, self.patch, self.grid)
        original = denormalize(images.float())
        rows = [original, original * visible, denormalize(pasted)]  # hidden patches shown black
        grid = torch.cat([torch.cat(list(r), dim=-1) for r in rows], dim=-2).clamp(0, 1)
        return {"mae/reconstruction": grid}
