"""DINOv2 objective: its loss as the sum of the paper's terms, teacher isolation, the separate iBOT head, centering,
registers, the patch-target collapse watch, config keys, and a short run through the real training loop (the losses
themselves: test_dinov2_losses.py)."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import torch

from ssl_vit.config.methods import DINOv2Config
from ssl_vit.config.pretrain import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from ssl_vit.methods import build_objective
from ssl_vit.methods.dino.loss import dino_loss, sinkhorn_knopp
from ssl_vit.methods.dino.monitor import CollapseWarning
from ssl_vit.methods.dinov2.loss import ibot_loss, koleo_loss
from ssl_vit.methods.dinov2.masking import sample_masks
from ssl_vit.methods.dinov2.model import DINOv2
from ssl_vit.models.backbone import build_backbone

TINY_VIT = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2)
TINY = DINOv2Config(out_dim=64, hidden_dim=32, bottleneck_dim=16, local_crops_number=2, local_crops_size=16,
                    freeze_last_layer_steps=1, warmup_teacher_temp_steps=3, ibot_out_dim=40, ibot_hidden_dim=32,
                    ibot_bottleneck_dim=16)


def _model(cfg: DINOv2Config = TINY, vit: ModelConfig = TINY_VIT, **kwargs) -> DINOv2:
    torch.manual_seed(0)
    return DINOv2(cfg, build_backbone(vit), total_steps=100, **kwargs)


def _batch(batch: int = 4, n_local: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    return {"image": [torch.randn(batch, 3, s, s, generator=g) for s in [32, 32] + [16] * n_local]}


# ---------------------------------------------------------------------------------------------------- objective


@torch.no_grad()
@pytest.mark.parametrize("shape", ["random", "block"])
def test_forward_loss_is_the_sum_of_the_papers_terms(shape):
    model = _model(dataclasses.replace(TINY, mask_shape=shape)).eval()  # eval: no drop-path, nothing accumulated
    batch = _batch()
    torch.manual_seed(5)
    out = model(batch, step=0)
    torch.manual_seed(5)
    grid = (4, 4) if shape == "block" else None  # 32 px crops of 8 px patches
    masks = sample_masks(8, 16, TINY.mask_ratio_range, TINY.mask_sample_probability, grid=grid)
    globals_ = torch.cat(batch["image"][:2])
    t = model.teacher["backbone"].forward_features(globals_)  # the teacher: unmasked crops, plain timm
    picked = t[:, 1:].flatten(0, 1)[masks.index]
    t_out = model.teacher["head"](torch.cat([t[:, 0], picked]))
    t_cls, t_patch = sinkhorn_knopp(t_out[:8], 0.04, 3), sinkhorn_knopp(t_out[8:], 0.04, 3)
    s = model.encode(model.backbone, globals_, mask=masks.mask, mask_token=model.mask_token)
    local = model.backbone.forward_features(torch.cat(batch["image"][2:]))[:, 0]
    s_out = model.head(torch.cat([s[:, 0], local, s[:, 1:].flatten(0, 1)[masks.index]]))
    dino = dino_loss(s_out[:16], t_cls, 4, 0.1)
    ibot = ibot_loss(s_out[16:], t_patch, masks.weight, 8, 0.1)
    koleo = koleo_loss(s[:4, 0]) + koleo_loss(s[4:, 0])
    assert out["dino_loss"].item() == pytest.approx(dino.item(), rel=1e-5)
    assert out["ibot_loss"].item() == pytest.approx(ibot.item(), rel=1e-5)
    assert out["koleo_loss"].item() == pytest.approx(koleo.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((dino + ibot + 0.1 * koleo).item(), rel=1e-5)
    assert masks.mask.any() and not torch.equal(s[:, 1:], model.backbone.forward_features(globals_)[:, 1:])


@pytest.mark.parametrize("separate", [False, True])
def test_every_trainable_parameter_gets_a_gradient_and_the_teacher_none(separate):
    model = _model(dataclasses.replace(TINY, ibot_separate_head=separate, freeze_last_layer_steps=0))
    model.train()
    model(_batch(), step=0)["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    assert model.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert ("ibot_head" in model.teacher) == separate and (model.ibot_head is not None) == separate


def test_separate_head_is_frozen_then_followed_by_its_teacher():
    model = _model(dataclasses.replace(TINY, ibot_separate_head=True))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    before = [p.clone() for p in model.teacher["ibot_head"].parameters()]
    model(_batch(), step=0)["loss"].backward()
    model.after_backward(0)  # step 0 < freeze_last_layer_steps = 1
    assert all(p.grad is None for p in model.ibot_head.last_layer.parameters())
    assert model.ibot_head.mlp[0].weight.grad is not None
    opt.step()
    model.after_step(0)
    after = list(model.teacher["ibot_head"].parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))  # the EMA reached the copy
    m = 0.992
    expected = m * before[0] + (1 - m) * model.ibot_head.mlp[0].weight.detach()
    torch.testing.assert_close(model.teacher["ibot_head"].mlp[0].weight, expected)


@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
def test_centers_move_only_under_softmax_centering(centering):
    model = _model(dataclasses.replace(TINY, centering=centering)).train()
    model(_batch(), step=0)["loss"].backward()
    model.after_step(0)
    moved = [bool(model.center.abs().sum() > 0), bool(model.patch_center.abs().sum() > 0)]
    assert moved == [centering == "softmax"] * 2


def test_without_ibot_there_is_no_mask_and_no_mask_token():
    model = _model(dataclasses.replace(TINY, ibot_loss_weight=0.0, ibot_separate_head=True))
    out = model(_batch(), step=0)
    assert model.mask_token is None and model.ibot_head is None and "ibot_loss" not in out
    out["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_registers_are_no_patches():
    model = _model(vit=dataclasses.replace(TINY_VIT, reg_tokens=4))
    assert model.backbone.num_prefix_tokens == 5
    out = model(_batch(), step=0)  # a mask of 16 patches (not 20 tokens) fits the grid
    assert math.isfinite(out["ibot_loss"].item())


def test_collapse_watch_covers_the_patch_targets():
    model = _model(dataclasses.replace(TINY, centering="softmax"), collapse_window=2).train()
    prototypes = model.teacher["head"].last_layer.parametrizations.weight.original1.data
    prototypes[:] = prototypes[0]  # all alike: every target uniform, cls and patch (a shared head) alike
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(3):
            model(_batch(), step=step)
            model.after_step(step)
        model.after_training()
    messages = [str(w.message) for w in caught if issubclass(w.category, CollapseWarning)]
    assert any(m.startswith("iBOT (patch targets) looks collapsed (uniform)") for m in messages), messages
    assert any(m.startswith("DINO looks collapsed (uniform)") for m in messages), messages


def test_build_objective_and_config_reach_dinov2():
    from ssl_vit.config.pretrain import ConfigError, load_config

    cfg = load_config(None, ["objective=dinov2", "dinov2.centering=softmax"])
    assert isinstance(cfg.dinov2, DINOv2Config) and cfg.dinov2.centering == "softmax"
    model = build_objective("dinov2", TINY, build_backbone(TINY_VIT), total_steps=7)
    assert isinstance(model, DINOv2) and model.total_steps == 7
    for override, message in [
        ("dinov2.centering=sinkhorn", "dinov2.centering: 'sinkhorn' is not one of ['sinkhorn_knopp', 'softmax']"),
        ("dinov2.mask_ratio_range=[0.5, 0.1]",
         "dinov2.mask_ratio_range: must be [min, max] with 0 < min <= max <= 1, got [0.5, 0.1]"),
        ("dinov2.mask_sample_probability=0", "dinov2.mask_sample_probability: must be in (0, 1], got 0.0"),
        ("dinov2.koleo_loss_weight=-1", "dinov2.koleo_loss_weight: must be at least 0, got -1.0"),
        ("dinov2.out_dim=1", "dinov2.out_dim: must be at least 2, got 1"),
    ]:
        with pytest.raises(ConfigError) as err:
            load_config(None, ["objective=dinov2", override])
        assert str(err.value) == message
    with pytest.raises(ConfigError, match="did you mean 'dinov2.koleo_loss_weight'"):
        load_config(None, ["dinov2.koleo_weight=0.1"])
    with pytest.raises(ConfigError, match=r"^dinov2.local_crops_size: must be a multiple of model.patch_size 8"):
        load_config(None, ["objective=dinov2", "model.img_size=32", "model.patch_size=8", "dinov2.local_crops_size=12"])


# ------------------------------------------------------------------------------------------ the training loop


def test_pretrain_two_steps_through_the_real_loop(tmp_path):
    from safetensors.torch import load_file

    from ssl_vit.data.demo import ensure_demo_data
    from ssl_vit.training.checkpoint import latest_checkpoint, load_backbone
    from ssl_vit.training.loop import pretrain

    demo = ensure_demo_data(tmp_path / "demo", n_train=32, n_knn_train=10, n_knn_val=10)
    cfg = Config(
        objective="dinov2", model=dataclasses.replace(TINY_VIT, reg_tokens=2),
        dinov2=dataclasses.replace(TINY, ibot_separate_head=True, centering="softmax"),
        data=DataConfig(train=demo.train, batch_size=4, num_workers=0, shuffle_buffer=8),
        optim=OptimConfig(lr=1e-3, clip_grad=3.0, weight_decay=0.04, weight_decay_end=0.4),
        train=TrainConfig(run_dir=str(tmp_path / "run"), total_steps=2, warmup_steps=1, log_every=1,
                          image_every=1, save_every=2),
    )
    result = pretrain(cfg)
    assert result.step == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for key in ("train/loss", "train/dino_loss", "train/ibot_loss", "train/koleo_loss", "train/patch_entropy"):
        assert all(math.isfinite(r[key]) for r in rows), key
    _, path = latest_checkpoint(tmp_path / "run")
    state = load_file(str(path / "model.safetensors"))
    assert {"mask_token", "patch_center", "center"} <= state.keys()
    assert any(k.startswith("teacher.ibot_head.") for k in state)
    vit, _ = load_backbone(result.backbone)  # the teacher's backbone, registers included, in plain timm
    torch.testing.assert_close(vit.state_dict()["reg_token"], state["teacher.backbone.reg_token"])

    # what users do with the export next: k-NN, a linear probe, attention maps (registers left out)
    from ssl_vit.cli.main import main

    frozen = ["--backbone", str(result.backbone), "--train", demo.knn_train, "--val", demo.knn_val,
              "--num-workers", "0", "--crop-ratio", "1.0"]
    assert main(["knn", *frozen, "--k", "5", "--batch-size", "8", "--out", str(tmp_path / "knn.json")]) == 0
    assert json.loads((tmp_path / "knn.json").read_text())["n_val"] == 10
    assert main(["linear-probe", *frozen, "--epochs", "1", "--warmup-epochs", "0", "--batch-size", "8", "--out",
                 str(tmp_path / "probe.json")]) == 0
    assert main(["visualize", "--backbone", str(result.backbone), "--shards", demo.knn_val, "--n", "2",
                 "--crop-ratio", "1.0", "--out", str(tmp_path / "png")]) == 0
    assert (tmp_path / "png" / "attention.png").is_file()
