"""The shared backbone: iBOT's masked input to `encode` against a naive per-token restatement, register tokens and
LayerScale from the config through export to plain timm, and every token reader leaving the registers out."""

import json

import pytest
import timm
import torch
from safetensors.torch import load_file

from ssl_vit.config.finetune import FTModelConfig
from ssl_vit.config.methods import DINOConfig, MAEConfig
from ssl_vit.config.pretrain import ConfigError, load_config
from ssl_vit.eval.features import FeatureSpec, image_features
from ssl_vit.eval.visualize import attention_figure, attention_maps, cls_to_patches
from ssl_vit.methods.classify.model import build_classifier
from ssl_vit.methods.dino.model import DINO
from ssl_vit.methods.mae.model import MAE, sincos_pos_embed_2d
from ssl_vit.models.backbone import backbone_kwargs, build_backbone, encode
from ssl_vit.training.checkpoint import export_backbone

KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=0, dynamic_img_size=True)


def tiny_vit(seed: int = 0, **extra):
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", **{**KW, **extra}).eval()


def block_input(vit, fn):
    """What the first block receives while `fn()` runs."""
    seen = []
    handle = vit.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    try:
        fn()
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_an_all_false_mask_equals_forward_features(reg_tokens):
    vit, x = tiny_vit(reg_tokens=reg_tokens), torch.randn(2, 3, 32, 32)
    token = torch.randn(48)
    with torch.no_grad():
        want = vit.forward_features(x)
        got = encode(vit, x, mask=torch.zeros(2, 16, dtype=torch.bool), mask_token=token)
    assert got.shape == (2, 1 + reg_tokens + 16, 48)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("reg_tokens", [0, 4])
def test_masked_patches_enter_as_the_mask_token_plus_their_position(reg_tokens):
    vit, x = tiny_vit(reg_tokens=reg_tokens), torch.randn(2, 3, 32, 32)
    token = torch.randn(1, 1, 48)
    mask = torch.rand(2, 16) < 0.5
    mask[0, 3], mask[1, 3] = True, False
    got = block_input(vit, lambda: encode(vit, x, mask=mask, mask_token=token))
    n_prefix = 1 + reg_tokens
    with torch.no_grad():
        embedded = vit.patch_embed(x).reshape(2, 16, 48)  # row-major patches
        for b in range(2):  # naive: one token at a time, the mask token before the position is added
            for i in range(16):
                content = token[0, 0] if mask[b, i] else embedded[b, i]
                torch.testing.assert_close(got[b, n_prefix + i], content + vit.pos_embed[0, n_prefix + i])


def test_the_masked_patches_pixels_no_longer_matter_and_the_token_gets_gradients():
    vit, x = tiny_vit(reg_tokens=4), torch.randn(2, 3, 32, 32)
    token = torch.nn.Parameter(torch.randn(48))
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 5] = True  # patch (row 1, column 1): pixels 8..15 x 8..15
    changed = x.clone()
    changed[..., 8:16, 8:16] += 3.0
    out = encode(vit, x, mask=mask, mask_token=token)
    with torch.no_grad():
        torch.testing.assert_close(encode(vit, changed, mask=mask, mask_token=token), out, rtol=0, atol=0)
        unmasked = encode(vit, x)
        assert not torch.allclose(encode(vit, changed), unmasked)  # without the mask those pixels count
    assert not torch.allclose(out[:, 5 + 5], unmasked[:, 5 + 5])  # the masked patch's own output changed
    out.sum().backward()
    assert token.grad is not None and token.grad.abs().sum() > 0


def test_bad_masks_are_one_line_errors():
    vit, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="a mask needs a mask_token"):
        encode(vit, x, mask=torch.zeros(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask has shape \[2, 9\], the images have 16 patches each in a batch of 2"):
        encode(vit, x, mask=torch.zeros(2, 9, dtype=torch.bool), mask_token=torch.zeros(48))


TINY = ["model.name=vit_tiny_patch16_224", "model.img_size=32", "model.patch_size=8", "model.embed_dim=48",
        "model.depth=2", "model.num_heads=3"]


def test_registers_and_layer_scale_come_from_the_config():
    cfg = load_config(None, [*TINY, "model.reg_tokens=4", "model.layer_scale_init=1e-5"])
    vit = build_backbone(cfg.model)
    assert vit.reg_token.shape == (1, 4, 48) and vit.num_prefix_tokens == 5
    for block in vit.blocks:
        assert torch.equal(block.ls1.gamma, torch.full((48,), 1e-5))
        assert torch.equal(block.ls2.gamma, torch.full((48,), 1e-5))
    plain = build_backbone(load_config(None, TINY).model)  # the defaults add neither
    assert plain.reg_token is None and plain.num_prefix_tokens == 1
    assert isinstance(plain.blocks[0].ls1, torch.nn.Identity)
    assert "reg_tokens" not in backbone_kwargs(load_config(None, TINY).model)  # exports of old runs are unchanged


@pytest.mark.parametrize("override, message", [
    ("model.reg_tokens=-1", "model.reg_tokens: must be at least 0 (0: the timm model's own, none for plain ViTs), "
                            "got -1"),
    ("model.layer_scale_init=0", "model.layer_scale_init: must be greater than 0 (or null: the timm model's own, "
                                 "none for plain ViTs), got 0.0"),
    ("model.reg_token=4", "unknown config key 'model.reg_token'; did you mean 'model.reg_tokens'?"),
])
def test_bad_register_and_layer_scale_values_are_refused_at_load(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [*TINY, override])
    assert str(err.value) == message


def test_an_export_with_registers_and_layer_scale_rebuilds_in_plain_timm(tmp_path):
    cfg = load_config(None, [*TINY, "model.reg_tokens=4", "model.layer_scale_init=1e-5"])
    vit = build_backbone(cfg.model).eval()
    with torch.no_grad():  # gains and registers unlike their init, so a rebuild that dropped them would show
        for block in vit.blocks:
            block.ls1.gamma.normal_()
        vit.reg_token.normal_()
    export_backbone(vit, tmp_path, cfg.model.name, backbone_kwargs(cfg.model))
    meta = json.loads((tmp_path / "backbone.json").read_text())
    assert meta["model_kwargs"]["reg_tokens"] == 4 and meta["model_kwargs"]["init_values"] == 1e-5
    rebuilt = timm.create_model(meta["model_name"], pretrained=False, **meta["model_kwargs"]).eval()
    rebuilt.load_state_dict(load_file(str(tmp_path / "backbone.safetensors")), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.forward_features(x), vit.forward_features(x))


def _train_two_steps(objective, batch):
    """Two optimizer steps through the objective's own hooks; the register tokens before and after."""
    optimizer = torch.optim.AdamW(objective.param_groups(0.05), lr=1e-3)
    before = objective.backbone.reg_token.detach().clone()
    for step in range(2):
        loss = objective(batch, step)["loss"]
        assert torch.isfinite(loss)
        loss.backward()
        objective.after_backward(step)
        unused = [n for n, p in objective.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused, f"parameters without a gradient: {unused}"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.after_step(step)
    return before, objective.backbone.reg_token.detach()


def test_mae_trains_with_registers_and_predicts_patches_only():
    cfg = load_config(None, [*TINY, "model.reg_tokens=4", "model.layer_scale_init=1e-5"])
    torch.manual_seed(0)
    mae = MAE(MAEConfig(decoder_dim=32, decoder_depth=1, decoder_heads=2), build_backbone(cfg.model))
    assert torch.equal(mae.backbone.pos_embed[0, :5], torch.zeros(5, 48))  # no position for the 1 + 4 prefix
    images = torch.randn(4, 3, 32, 32)
    pred, target, mask = mae.reconstruct(images)
    assert pred.shape == target.shape == (4, 16, 8 * 8 * 3) and mask.shape == (4, 16)
    before, after = _train_two_steps(mae, {"image": images})
    assert not torch.equal(before, after)


def test_mae_takes_a_timm_model_whose_prefix_tokens_have_no_position():
    torch.manual_seed(0)  # timm's *_reg* ViTs: no_embed_class, the position embedding covers the patches only
    vit = timm.create_model("vit_tiny_patch16_224", **{**KW, "reg_tokens": 4, "no_embed_class": True})
    mae = MAE(MAEConfig(decoder_dim=32, decoder_depth=1, decoder_heads=2), vit)
    torch.testing.assert_close(mae.backbone.pos_embed[0], sincos_pos_embed_2d(48, (4, 4)))
    assert torch.isfinite(mae({"image": torch.randn(2, 3, 32, 32)}, 0)["loss"])


def test_dino_trains_with_registers_on_the_cls_token():
    cfg = load_config(None, [*TINY, "model.reg_tokens=4", "model.layer_scale_init=1e-5"])
    torch.manual_seed(0)
    dino = DINO(DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, local_crops_number=2, local_crops_size=16,
                           freeze_last_layer_steps=0),
                build_backbone(cfg.model), total_steps=10)
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(4, 3, s, s, generator=g) for s in (32, 32, 16, 16)]
    before, after = _train_two_steps(dino, {"image": crops})
    assert not torch.equal(before, after)
    assert not torch.equal(dino.teacher["backbone"].reg_token, before)  # the EMA teacher follows the registers


def test_features_of_a_register_backbone_leave_the_registers_out():
    vit, x = tiny_vit(reg_tokens=4), torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        tokens = encode(vit, x)  # (B, 1 + 4 + 16, D)
        cls, avg = image_features(vit, x, FeatureSpec("cls")), image_features(vit, x, FeatureSpec("avg"))
        both = image_features(vit, x, FeatureSpec("cls", n_last_blocks=2, avgpool=True))
    assert cls.shape == avg.shape == (3, 48) and both.shape == (3, 3 * 48)
    torch.testing.assert_close(cls, tokens[:, 0])
    naive = torch.stack([sum(tokens[b, 5 + i] for i in range(16)) / 16 for b in range(3)])  # the patch tokens only
    torch.testing.assert_close(avg, naive)
    torch.testing.assert_close(both[:, 2 * 48:], naive)


def test_attention_maps_of_a_register_backbone_cover_the_patch_grid_only():
    vit, x = tiny_vit(reg_tokens=4), torch.randn(2, 3, 32, 32)
    maps = attention_maps(vit, x)
    assert maps[-1].shape == (2, 3, 21, 21)  # cls, 4 registers, 16 patches
    heads = cls_to_patches(maps[-1], vit.num_prefix_tokens, (4, 4))
    assert heads.shape == (2, 3, 4, 4)
    torch.testing.assert_close(heads.flatten(-2), maps[-1][:, :, 0, 5:])  # cls row, registers dropped
    plain = attention_figure(tiny_vit(), x)
    assert attention_figure(vit, x).shape == plain.shape


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_fine_tuning_pools_a_register_backbone_without_the_registers(tmp_path, pool):
    cfg = load_config(None, [*TINY, "model.reg_tokens=4", "model.layer_scale_init=1e-5"])
    export_backbone(build_backbone(cfg.model), tmp_path, cfg.model.name, backbone_kwargs(cfg.model))
    model, _, _ = build_classifier(FTModelConfig(backbone=str(tmp_path), pool=pool), num_classes=3)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_features(x)
        pooled = model.fc_norm(tokens[:, 5:].mean(dim=1)) if pool == "avg" else tokens[:, 0]
        torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), pooled)
