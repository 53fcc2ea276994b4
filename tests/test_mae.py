"""MAE pieces against naive re-statements of the paper."""

import math

import pytest
import torch

from ssl_vit.config.methods import MAEConfig
from ssl_vit.config.pretrain import ModelConfig
from ssl_vit.methods.mae.loss import masked_mse, pixel_target
from ssl_vit.methods.mae.model import MAE, patchify, random_masking, sincos_pos_embed_2d, unpatchify
from ssl_vit.models.backbone import build_backbone, encode

TINY = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2)
TINY_MAE = MAEConfig(decoder_dim=32, decoder_depth=1, decoder_heads=2)


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75, 0.9])
def test_random_masking(ratio):
    torch.manual_seed(0)
    b, length = 6, 64
    keep, mask, restore = random_masking(b, length, ratio)
    n_keep = int(length * (1 - ratio))
    assert keep.shape == (b, n_keep) and mask.shape == (b, length)
    assert (mask.sum(1) == length - n_keep).all()
    for i in range(b):  # the kept indices are exactly the unmasked patches
        assert set(keep[i].tolist()) == set((mask[i] == 0).nonzero().flatten().tolist())
    # restore inverts the shuffle: kept-first order gathered by restore gives patch order back
    shuffle = restore.argsort(dim=1)
    tokens = torch.arange(length).expand(b, -1)
    assert torch.equal(tokens.gather(1, shuffle).gather(1, restore), tokens)
    assert torch.equal(shuffle[:, :n_keep], keep)
    if 0 < ratio:
        assert len({tuple(m.tolist()) for m in mask}) == b, "every sample draws its own mask"


def test_sincos_pos_embed_is_the_reference_layout_per_position():
    """MAE's reference: token (row i, column j) of a row-major grid gets [sin(j·ω), cos(j·ω), sin(i·ω), cos(i·ω)]
    with ω_k = 1 / 10000^(k / (dim/4)): the column in the first half, as its released weights have it."""
    dim, rows, cols = 16, 3, 5
    got = sincos_pos_embed_2d(dim, (rows, cols))
    omega = [1 / 10000 ** (k / (dim // 4)) for k in range(dim // 4)]
    for i in range(rows):
        for j in range(cols):
            want = ([math.sin(j * w) for w in omega] + [math.cos(j * w) for w in omega]
                    + [math.sin(i * w) for w in omega] + [math.cos(i * w) for w in omega])
            torch.testing.assert_close(got[i * cols + j], torch.tensor(want))


def test_patchify_round_trip_and_layout():
    x = torch.randn(2, 3, 32, 24)
    p = patchify(x, 8)
    assert p.shape == (2, 4 * 3, 8 * 8 * 3)
    assert torch.equal(unpatchify(p, 8, (4, 3)), x)
    # patch (row 1, col 2) holds pixels [8:16, 16:24], laid out (row, col, channel)
    assert torch.equal(p[0, 1 * 3 + 2], x[0, :, 8:16, 16:24].permute(1, 2, 0).reshape(-1))


def test_norm_pix_target_and_masked_loss_naive():
    torch.manual_seed(0)
    patches, pred = torch.randn(3, 10, 12), torch.randn(3, 10, 12)
    mask = (torch.rand(3, 10) > 0.5).float()
    target = pixel_target(patches, norm_pix=True)
    naive_total, n = 0.0, 0
    for b in range(3):
        for i in range(10):
            if mask[b, i]:
                t = patches[b, i]
                t = (t - t.mean()) / (t.var(unbiased=True) + 1e-6) ** 0.5
                naive_total += ((pred[b, i] - t) ** 2).mean()
                n += 1
    assert torch.allclose(masked_mse(pred, target, mask), naive_total / n, atol=1e-6)


def test_loss_ignores_visible_patches():
    torch.manual_seed(0)
    pred, target = torch.randn(2, 16, 48), torch.randn(2, 16, 48)
    mask = torch.zeros(2, 16)
    mask[:, ::2] = 1
    changed = pred.clone()
    changed[:, 1::2] += 100.0  # visible patches: any prediction there is free
    assert masked_mse(pred, target, mask) == masked_mse(changed, target, mask)
    assert masked_mse(pred + mask.unsqueeze(-1), target, mask) != masked_mse(pred, target, mask)


def test_keep_all_masked_encode_equals_forward():
    torch.manual_seed(0)
    vit = build_backbone(TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(encode(vit, x), vit.forward_features(x), atol=1e-6)
    keep_all = torch.randperm(64).sort().values.expand(2, -1)
    assert torch.allclose(encode(vit, x, keep_all), vit.forward_features(x), atol=1e-5)
    keep = torch.stack([torch.randperm(64)[:16] for _ in range(2)])
    assert encode(vit, x, keep).shape == (2, 1 + 16, 64)


def test_mae_objective_trains_every_parameter():
    torch.manual_seed(0)
    mae = MAE(TINY_MAE, build_backbone(TINY))
    assert not mae.backbone.pos_embed.requires_grad, "MAE's encoder position embedding is fixed sin-cos"
    out = mae({"image": torch.randn(4, 3, 32, 32)}, step=0)
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = [n for n, p in mae.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"unused parameters would need DDP's find_unused_parameters: {missing}"
    grid = mae.visualize({"image": torch.randn(3, 3, 32, 32)})["mae/reconstruction"]
    assert grid.shape == (3, 3 * 32, 3 * 32) and 0 <= grid.min() and grid.max() <= 1


def _capture_masks_and_predictions(mae: MAE, monkeypatch) -> tuple[list, list]:
    """Lists that fill with each forward's (keep_idx, mask, restore) and decoder output."""
    import ssl_vit.methods.mae.model as mae_module

    masks, preds = [], []
    real_masking = mae_module.random_masking

    def spy(*args, **kwargs):
        masks.append(real_masking(*args, **kwargs))
        return masks[-1]

    monkeypatch.setattr(mae_module, "random_masking", spy)
    mae.decoder.register_forward_hook(lambda m, a, out: preds.append(out))
    return masks, preds


@pytest.mark.parametrize("norm_pix", [True, False])
@torch.no_grad()
def test_forward_loss_is_the_papers_on_the_decoders_output(monkeypatch, norm_pix):
    # the whole forward against the paper, written out: each hidden patch's pixels (normalised by the patch's
    # own mean and unbiased variance + 1e-6 with norm_pix_loss), squared error averaged over its pixels, then
    # over the hidden patches only
    torch.manual_seed(0)
    mae = MAE(MAEConfig(decoder_dim=32, decoder_depth=1, decoder_heads=2, norm_pix_loss=norm_pix),
              build_backbone(TINY))
    masks, preds = _capture_masks_and_predictions(mae, monkeypatch)
    images = torch.randn(3, 3, 32, 32)
    loss = mae({"image": images}, step=0)["loss"]
    (_, mask, _), pred, p = masks[0], preds[0], 4
    assert mask.sum(dim=1).tolist() == [64 - int(64 * 0.25)] * 3  # mask ratio 0.75 of the 8 × 8 patches
    total, count = 0.0, 0
    for b in range(3):
        for i in range(8):
            for j in range(8):
                if not mask[b, i * 8 + j]:
                    continue
                pixels = images[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p].permute(1, 2, 0).reshape(-1)
                if norm_pix:
                    pixels = (pixels - pixels.mean()) / (pixels.var(unbiased=True) + 1e-6) ** 0.5
                total += ((pred[b, i * 8 + j] - pixels) ** 2).mean().item()
                count += 1
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


@torch.no_grad()
def test_reconstruction_image_shows_the_prediction_in_the_hidden_patches(monkeypatch):
    from ssl_vit.data.transforms import denormalize

    torch.manual_seed(0)
    mae = MAE(TINY_MAE, build_backbone(TINY)).eval()
    masks, preds = _capture_masks_and_predictions(mae, monkeypatch)
    images = torch.randn(2, 3, 32, 32)
    grid = mae.visualize({"image": images})["mae/reconstruction"]  # rows: original, masked, reconstruction
    mask, pred, p = masks[0][1], preds[0], 4
    for b in range(2):
        for patch in (int(mask[b].argmax()), int((1 - mask[b]).argmax())):  # one hidden, one visible
            i, j = divmod(patch, 8)
            rows, cols = slice(64 + i * p, 64 + (i + 1) * p), slice(b * 32 + j * p, b * 32 + (j + 1) * p)
            pixels = images[b, :, i * p:(i + 1) * p, j * p:(j + 1) * p]
            if mask[b, patch]:  # the prediction, mapped back from the patch's normalised space by its own stats
                flat = pixels.permute(1, 2, 0).reshape(-1)
                want = pred[b, patch] * (flat.var() + 1e-6) ** 0.5 + flat.mean()
                pixels = want.reshape(p, p, 3).permute(2, 0, 1)
            torch.testing.assert_close(grid[:, rows, cols], denormalize(pixels), atol=1e-5, rtol=0)


def test_param_groups_exclude_norms_biases_and_tokens():
    mae = MAE(TINY_MAE, build_backbone(TINY))
    decay, no_decay = mae.param_groups(0.05)
    named = {id(p): n for n, p in mae.named_parameters()}
    no_decay_names = {named[id(p)] for p in no_decay["params"]}
    assert {"backbone.cls_token", "decoder.mask_token", "backbone.norm.weight"} <= no_decay_names
    assert all(p.ndim > 1 for p in decay["params"]) and decay["weight_decay"] == 0.05
    assert "backbone.pos_embed" not in no_decay_names | {named[id(p)] for p in decay["params"]}  # frozen


@pytest.mark.parametrize(("name", "message"), [
    ("vit_smol_patch16_224", r"^model.name: Unknown model \(vit_smol_patch16_224\)$"),
    ("resnet18", r"^model.name: 'resnet18' is not a timm VisionTransformer \(.*unexpected keyword argument.*\)$"),
])
def test_a_model_name_that_is_no_vit_is_one_line(name, message):
    from ssl_vit.config.pretrain import ModelConfig
    from ssl_vit.models.backbone import build_backbone

    with pytest.raises(ValueError, match=message):
        build_backbone(ModelConfig(name=name, img_size=32, patch_size=8))
