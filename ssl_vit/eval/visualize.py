"""PNGs to look at a backbone: per-head cls attention with thresholded masks, attention rollout, and a run's
reconstructions. Drawn with torchvision's make_grid (no plotting library)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from timm.layers import Attention
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from torchvision.utils import make_grid, save_image

from ssl_vit.data.samples import to_rgb
from ssl_vit.data.shards import eval_stream
from ssl_vit.data.transforms import denormalize, eval_transform
from ssl_vit.methods import OBJECTIVES, Objective

# "inferno"-like ramp from dark (no attention) to bright (most attention)
_RAMP = torch.tensor([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]]) / 255.0


@torch.no_grad()
def attention_maps(vit: VisionTransformer, images: Tensor) -> list[Tensor]:
    """Attention weights (B, heads, N = prefix + patches, N) of every block. Blocks keep their fused kernel (SDPA
    returns no weights): a hook on `attn.qkv` recomputes them from q and k; the forward is the model's own."""
    found: list[Tensor] = []
    handles = []
    for i, block in enumerate(vit.blocks):
        if not isinstance(block.attn, Attention):
            raise ValueError(f"block {i} uses {type(block.attn).__name__}; attention maps need timm's Attention")

        def hook(module: torch.nn.Module, inputs: tuple, qkv: Tensor, attn: Attention = block.attn) -> None:
            b, n, _ = qkv.shape
            q, k, _ = qkv.reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            q, k = attn.q_norm(q), attn.k_norm(k)  # (B, heads, N, head_dim)
            found.append(((q * attn.scale) @ k.transpose(-2, -1)).float().softmax(dim=-1))

        handles.append(block.attn.qkv.register_forward_hook(hook))
    was_training = vit.training
    try:
        vit.eval()
        vit.forward_features(images)
    finally:
        for handle in handles:
            handle.remove()
        vit.train(was_training)
    return found


def attention_rollout(maps: Sequence[Tensor]) -> Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): (B, N, N) flow from every token to every input token; per
    layer heads averaged, identity (the residual path) added, rows renormalised, layers multiplied first to last."""
    if not maps:
        raise ValueError("attention rollout needs at least one layer")
    rollout = None
    for a in maps:
        fused = a.float().mean(dim=1) + torch.eye(a.shape[-1], device=a.device)  # (B, N, N)
        fused = fused / fused.sum(dim=-1, keepdim=True)
        rollout = fused if rollout is None else fused @ rollout
    return rollout


def cls_to_patches(attn: Tensor, n_prefix: int, grid: tuple[int, int]) -> Tensor:
    """The cls token's row over the patch tokens as maps: (B, [heads,] N, N) → (B, [heads,] gh, gw)."""
    row = attn[..., 0, n_prefix:]
    return row.reshape(*row.shape[:-1], *grid)


def mass_mask(maps: Tensor, keep: float) -> Tensor:
    """Bool mask of the highest cells of each (last two dims) map holding a `keep` share of its total (DINO's
    threshold): a cell is kept while the mass of all larger cells is still below `keep`."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    flat = maps.flatten(-2)
    values, order = flat.sort(dim=-1, descending=True)
    share = values / values.sum(dim=-1, keepdim=True)
    before = share.cumsum(dim=-1) - share  # mass of the strictly larger cells
    keep_sorted = before < keep
    mask = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    return mask.view(maps.shape)


def load_images(img_size: int, paths: Sequence[str] = (), shards: str | None = None, n: int = 4,
                crop_ratio: float = 0.875, allow_pipe: bool = False) -> Tensor:
    """(B, 3, S, S) normalised images: the files in `paths`, else the first `n` samples of `shards`. A file that
    cannot be read is an error, not a skipped image: a row left out would put later images under wrong names."""
    transform = eval_transform(img_size, crop_ratio)
    if paths:
        return torch.stack([transform(read_image(path)) for path in paths])
    if not shards:
        raise ValueError("give image files or shards to take the images from")
    loader = eval_stream(shards, transform, batch_size=n, num_workers=0, rank=0, world_size=1,
                         allow_pipe=allow_pipe)
    batch = next((b for b in loader if b["key"]), None)  # a batch without keys holds only skip counts
    if batch is None:
        raise ValueError(f"no readable image in {shards}")
    return batch["image"][:n]


def read_image(path: str | Path) -> Image.Image:
    """An image file as 8-bit RGB, fully decoded; a one-line error naming it when it cannot be."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as img:
            return to_rgb(img)  # decodes every pixel: a truncated file fails here, not in the transform
    except Image.DecompressionBombError as err:  # PIL's own limit (Image.MAX_IMAGE_PIXELS), not a broken file
        raise ValueError(f"image {path} is too large to decode safely: {err}") from None
    except Exception as err:  # PIL raises UnidentifiedImageError, OSError, SyntaxError ... for broken data
        raise ValueError(f"image {path} cannot be read: {type(err).__name__}: {err}") from None


def colorize(maps: Tensor) -> Tensor:
    """(..., H, W) maps → (..., 3, H, W) colours, each map stretched to its own min..max."""
    flat = maps.float().flatten(-2)
    lo, hi = flat.min(dim=-1, keepdim=True).values, flat.max(dim=-1, keepdim=True).values
    t = ((flat - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1) * (len(_RAMP) - 1)
    i = t.floor().long().clamp(max=len(_RAMP) - 2)
    frac = (t - i).unsqueeze(-1)
    rgb = _RAMP[i] * (1 - frac) + _RAMP[i + 1] * frac  # (..., H·W, 3)
    return rgb.movedim(-1, -2).reshape(*maps.shape[:-2], 3, *maps.shape[-2:])


def attention_figure(vit: VisionTransformer, images: Tensor, keep: float = 0.6, scale: int | None = None) -> Tensor:
    """(3, H, W) grid, two rows per image: [image, cls attention of each last-layer head, rollout], then
    [mean-head mask, each head's mask, rollout mask] over the image; a mask keeps the patches that hold a
    `keep` share of the attention mass (DINO's visualisation). Tiles are S·scale pixels (default ≥ 128)."""
    if not vit.has_class_token:  # row 0 would be a register token's, or a patch's
        raise ValueError("attention maps show the cls token's attention, and this backbone has no cls token")
    s = images.shape[-1]
    scale = scale or max(1, -(-128 // s))  # the smallest factor that makes a tile ≥ 128 px
    upsample = partial(F.interpolate, size=(s * scale, s * scale), mode="nearest")  # a patch stays one flat block
    grid = tuple(vit.patch_embed.dynamic_feat_size(images.shape[-2:]))
    images = images.to(next(vit.parameters()).device)
    maps = attention_maps(vit, images)  # every layer: the rollout needs them all, the last one gives heads
    heads = cls_to_patches(maps[-1], vit.num_prefix_tokens, grid).cpu()  # (B, heads, gh, gw)
    rollout = cls_to_patches(attention_rollout(maps), vit.num_prefix_tokens, grid).cpu()  # (B, gh, gw)
    all_maps = torch.cat([heads, rollout.unsqueeze(1)], dim=1)  # (B, heads + 1, gh, gw)
    masks = torch.cat([mass_mask(heads.mean(dim=1, keepdim=True), keep), mass_mask(all_maps, keep)], dim=1)
    pictures = upsample(denormalize(images.float().cpu()))  # (B, 3, T, T)
    tiles = []
    for b in range(images.shape[0]):
        tiles += [pictures[b], *upsample(colorize(all_maps[b]))]
        dimmed = 0.2 + 0.8 * upsample(masks[b].unsqueeze(1).float())  # (heads + 2, 1, T, T): masked-out dimmed
        tiles += list(pictures[b] * dimmed)
    return make_grid(torch.stack(tiles), nrow=heads.shape[1] + 2, pad_value=1.0)


def reconstruction_figure(objective: Objective, images: Tensor, seed: int = 0, scale: int | None = None) -> Tensor:
    """The `<name>/reconstruction` figure of `objective.visualize` for `images` (MAE's: rows original, masked
    input, reconstruction, one column per image), tiles upscaled to ≥ 128 px; random masks drawn from `seed`."""
    if not callable(getattr(objective, "reconstruct", None)):  # the objectives that draw reconstructions
        able = sorted(name for name, cls in OBJECTIVES.items() if callable(getattr(cls, "reconstruct", None)))
        raise ValueError(f"reconstructions need a run of an objective that reconstructs images ({', '.join(able)}); "
                         f"this one is {type(objective).__name__}")
    s = images.shape[-1]
    scale = scale or max(1, -(-128 // s))  # the smallest factor that makes a tile ≥ 128 px
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        figures = objective.visualize({"image": images}, n=images.shape[0])
    (figure,) = [image for name, image in figures.items() if name.endswith("/reconstruction")]
    return F.interpolate(figure.unsqueeze(0).float().cpu(), scale_factor=scale, mode="nearest")[0]


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write a (3, H, W) image in [0, 1] as PNG (creating the folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(image.clamp(0, 1), str(path))
    return path
