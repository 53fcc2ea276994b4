"""Continuing from weights: the backbone freeze (exact under gradient accumulation and resume, the EMA teacher kept
equal to the frozen student), the backbone's lr scale and layer decay per parameter, and Gram anchoring against
its formula, in tiny runs through the real loop."""

from __future__ import annotations

import json
from functools import partial

import pytest
import torch
from safetensors.torch import load_file
from test_resume import TINY, TINY_MODEL

from ssl_vit.config.methods import DINOConfig, DINOv2Config
from ssl_vit.config.pretrain import ConfigError, ModelConfig, doubtful_settings, load_config
from ssl_vit.data.demo import ensure_demo_data
from ssl_vit.methods import OBJECTIVES, build_objective
from ssl_vit.methods.dino.gram import gram_loss
from ssl_vit.methods.dinov2.model import DINOv2
from ssl_vit.models.backbone import build_backbone
from ssl_vit.training.loop import build_optimizer, pretrain

RUN = ["data.batch_size=2", "data.shuffle_buffer=8", "data.num_workers=0", "optim.lr=1e-3", "optim.accum_steps=2",
       "train.warmup_steps=0", "train.log_every=1", "train.image_every=0", "train.keep_last=0", "train.export=false"]
# the heads' last layers train from step 0: only the backbone freeze holds anything back
NO_LAST_LAYER_FREEZE = {"mae": [], "dino": ["dino.freeze_last_layer_steps=0"],
                        "dinov2": ["dinov2.freeze_last_layer_steps=0"]}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return ensure_demo_data(tmp_path_factory.mktemp("demo"), n_train=32, n_knn_train=10, n_knn_val=10).train


def _args(objective: str, shards, run_dir, *extra: str) -> list[str]:
    return (TINY_MODEL + TINY[objective] + NO_LAST_LAYER_FREEZE[objective] + RUN
            + [f"data.train={shards}", f"train.run_dir={run_dir}", *extra])


@pytest.fixture
def watch(monkeypatch):
    """`watch(cls)`: records, around the real hooks, the objective's state before its first update (`start`) and
    after each optimizer step (`steps[step]`)."""
    seen: dict = {"start": None, "steps": {}}

    def install(cls):
        real_backward, real_step = cls.after_backward, cls.after_step

        def after_backward(self, step):
            if seen["start"] is None:
                seen["start"] = {k: v.clone() for k, v in self.state_dict().items()}
            real_backward(self, step)

        def after_step(self, step):
            real_step(self, step)
            seen["steps"][step] = {k: v.clone() for k, v in self.state_dict().items()}

        monkeypatch.setattr(cls, "after_backward", after_backward)
        monkeypatch.setattr(cls, "after_step", after_step)
        return seen

    return install


def _part(state: dict, prefix: str) -> dict:
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ backbone freeze


@pytest.mark.parametrize("objective", ["mae", "dino", "dinov2"])
def test_freeze_holds_the_backbone_bit_identical_for_n_steps_and_trains_the_methods_own_parts(
        tmp_path, shards, watch, objective):
    seen = watch(OBJECTIVES[objective])
    pretrain(load_config(None, _args(objective, shards, tmp_path, "train.total_steps=3",
                                     "train.freeze_backbone_steps=2", "train.save_every=0")))
    start, steps = seen["start"], seen["steps"]
    own = "decoder." if objective == "mae" else "head."
    for step in (0, 1):  # frozen: not moved, not decayed, under two accumulated micro-batches a step
        assert _equal(_part(steps[step], "backbone."), _part(start, "backbone."))
        assert not _equal(_part(steps[step], own), _part(start, own))  # the method's own parts train
        if objective != "mae":  # the EMA of a student that stands still is that student, bit for bit
            assert _equal(_part(steps[step], "teacher.backbone."), _part(start, "backbone."))
    moved = [k for k, v in _part(steps[2], "backbone.").items() if not torch.equal(v, start["backbone." + k])]
    assert "blocks.0.attn.qkv.weight" in moved  # step 3 (index 2) trains the backbone


@pytest.mark.parametrize(("objective", "token"), [("mae", "decoder.mask_token"), ("dinov2", "mask_token")])
def test_mask_tokens_are_the_methods_own_and_train_while_the_backbone_is_frozen(tmp_path, shards, watch, objective,
                                                                                token):
    seen = watch(OBJECTIVES[objective])
    pretrain(load_config(None, _args(objective, shards, tmp_path, "train.total_steps=1",
                                     "train.freeze_backbone_steps=1", "train.save_every=0")))
    assert not torch.equal(seen["steps"][0][token], seen["start"][token])


def test_a_resumed_run_inside_the_freeze_still_freezes_and_matches_a_straight_run(tmp_path, shards, watch,
                                                                                  crash_in_step):
    args = ["train.total_steps=4", "train.freeze_backbone_steps=3", "train.save_every=2"]
    straight = tmp_path / "straight"
    pretrain(load_config(None, _args("dinov2", shards, straight, *args)))
    seen = watch(DINOv2)
    cfg = load_config(None, _args("dinov2", shards, tmp_path / "resumed", *args))
    with crash_in_step(DINOv2, 2):
        pretrain(cfg)
    start = seen["start"]
    seen["start"] = None
    pretrain(cfg)  # from the checkpoint at step 2: step index 2 is still frozen
    assert _equal(_part(seen["steps"][2], "backbone."), _part(start, "backbone."))
    assert not _equal(_part(seen["steps"][3], "backbone."), _part(start, "backbone."))
    a, b = (load_file(run / "checkpoints" / "step_00000004" / "model.safetensors")
            for run in (straight, tmp_path / "resumed"))
    assert _equal(a, b)


def test_a_freeze_or_a_gram_anchor_without_init_weights_is_doubted():
    doubts = doubtful_settings(load_config(None, ["objective=dinov2", "train.freeze_backbone_steps=3",
                                                  "dinov2.gram_loss_weight=1.0"]))
    assert doubts == ["train.freeze_backbone_steps 3 without model.init: the backbone stays at its random init for "
                      "those steps",
                      "dinov2.gram_loss_weight 1.0 without model.init: the Gram anchor is the random initial backbone"]
    assert doubtful_settings(load_config(None, ["objective=dinov2", "train.freeze_backbone_steps=3",
                                                "dinov2.gram_loss_weight=1.0", "model.init=w.safetensors"])) == []


def test_a_freeze_as_long_as_the_run_is_doubted():
    assert doubtful_settings(load_config(None, ["train.freeze_backbone_steps=5", "train.total_steps=5",
                                                "model.init=w.pth", "train.warmup_steps=1"])) == [
        "train.freeze_backbone_steps 5 >= train.total_steps 5: the backbone never trains, only the method's own "
        "parts do"]


# ------------------------------------------------------------------------------------- lr scale and layer decay


def _naive_scale_and_wd(name: str, param: torch.Tensor, depth: int, lr_scale: float, decay: float, wd: float):
    """MAE's layer ids written out: stem 0, block i → i + 1, the rest depth + 1; × decay^(depth + 1 − id)."""
    no_wd = param.ndim <= 1 or name.rsplit(".", 1)[-1] in ("cls_token", "reg_token", "mask_token", "pos_embed")
    if not name.startswith("backbone."):
        return 1.0, 0.0 if no_wd else wd
    short = name.removeprefix("backbone.")
    if short.startswith(("cls_token", "reg_token", "pos_embed", "patch_embed.", "norm_pre.")):
        layer = 0
    elif short.startswith("blocks."):
        layer = int(short.split(".")[1]) + 1
    else:
        layer = depth + 1
    return lr_scale * decay ** (depth + 1 - layer), 0.0 if no_wd else wd


@pytest.mark.parametrize("objective", ["mae", "dinov2"])
def test_backbone_lr_scale_and_layer_decay_per_parameter(objective):
    cfg = load_config(None, TINY_MODEL + TINY[objective] + ["model.reg_tokens=1", "optim.backbone_lr_scale=0.1",
                                                           "optim.layer_decay=0.5", "optim.weight_decay=0.05"])
    model = build_objective(objective, getattr(cfg, objective), build_backbone(cfg.model))
    groups = build_optimizer(model, cfg, use_fused=False).param_groups
    placed = {id(p): (g.get("lr_scale", 1.0), g["weight_decay"] if g["apply_wd"] else 0.0)
              for g in groups for p in g["params"]}
    assert len(placed) == sum(len(g["params"]) for g in groups)  # each parameter in one group
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(placed) == {id(p) for p in trainable.values()}  # no teacher, no fixed MAE position embedding
    for name, param in trainable.items():
        scale, wd = _naive_scale_and_wd(name, param, cfg.model.depth, 0.1, 0.5, 0.05)
        assert placed[id(param)] == (pytest.approx(scale), wd), name


def test_the_loop_steps_the_backbone_at_its_scaled_lr(tmp_path, shards):
    # the lrs the optimizer stepped with at the last step (constant lr: no warmup, min_lr = lr), as saved
    pretrain(load_config(None, _args("dino", shards, tmp_path, "train.total_steps=1", "train.save_every=0",
                                     "optim.min_lr=1e-3", "optim.backbone_lr_scale=0.1", "optim.layer_decay=0.5")))
    groups = torch.load(tmp_path / "checkpoints" / "step_00000001" / "optimizer.bin", weights_only=True)["param_groups"]
    # depth 2: the stem 0.1 × 0.5³, the blocks 0.1 × 0.5² and 0.1 × 0.5, the final norm 0.1; the head 1
    assert sorted({round(g["lr"] / 1e-3, 6) for g in groups}) == [0.0125, 0.025, 0.05, 0.1, 1.0]
    assert all(g["lr"] == pytest.approx(1e-3 * g.get("lr_scale", 1.0)) for g in groups)


def test_without_scale_or_decay_the_two_groups_are_unchanged():
    cfg = load_config(None, TINY_MODEL + TINY["dinov2"])
    model = build_objective("dinov2", cfg.dinov2, build_backbone(cfg.model))
    groups = model.param_groups(0.05)
    assert [(g["weight_decay"], g["apply_wd"], "lr_scale" in g) for g in groups] == [(0.05, True, False),
                                                                                   (0.0, False, False)]


@pytest.mark.parametrize(("override", "error"), [
    ("optim.layer_decay=0", "optim.layer_decay: must be in (0, 1] (1: off), got 0.0"),
    ("optim.layer_decay=1.5", "optim.layer_decay: must be in (0, 1] (1: off), got 1.5"),
    ("optim.backbone_lr_scale=0", "optim.backbone_lr_scale: must be greater than 0, got 0.0"),
    ("train.freeze_backbone_steps=-1", "train.freeze_backbone_steps: must be at least 0 (0: none), got -1"),
    ("dino.gram_loss_weight=-1", "dino.gram_loss_weight: must be at least 0 (0: off), got -1.0"),
    ("dinov2.gram_loss_weight=-0.5", "dinov2.gram_loss_weight: must be at least 0 (0: off), got -0.5"),
])
def test_the_new_keys_are_range_checked_in_one_line(override, error):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert str(info.value) == error


# ------------------------------------------------------------------------------------------------ Gram anchoring


def _naive_gram(student: torch.Tensor, anchor: torch.Tensor) -> float:
    """DINOv3's L_Gram = ‖X_S X_Sᵀ − X_G X_Gᵀ‖²_F over the P patches of each crop, X L2-normalised, / P², averaged
    over the crops: plain loops over the patch pairs."""
    crops, patches, _ = student.shape
    total = 0.0
    for n in range(crops):
        for p in range(patches):
            for q in range(patches):
                s = torch.dot(student[n, p], student[n, q]) / (student[n, p].norm() * student[n, q].norm())
                g = torch.dot(anchor[n, p], anchor[n, q]) / (anchor[n, p].norm() * anchor[n, q].norm())
                total += float(s - g) ** 2
    return total / (crops * patches * patches)


@pytest.mark.parametrize(("crops", "patches", "dim"), [(1, 1, 3), (2, 5, 4), (3, 16, 8)])
def test_gram_loss_matches_a_naive_restatement(crops, patches, dim):
    g = torch.Generator().manual_seed(crops * 100 + patches)
    student, anchor = (torch.randn(crops, patches, dim, generator=g, dtype=torch.float64) for _ in range(2))
    assert gram_loss(student, anchor).item() == pytest.approx(_naive_gram(student, anchor), rel=1e-5, abs=1e-9)
    scaled = student * torch.rand(crops, patches, 1, generator=g, dtype=torch.float64).add(0.5)  # norms do not count
    assert gram_loss(scaled, anchor).item() == pytest.approx(_naive_gram(student, anchor), rel=1e-5, abs=1e-9)
    assert gram_loss(anchor, anchor).item() == pytest.approx(0.0, abs=1e-12)


def test_gram_loss_refuses_features_of_different_shapes():
    with pytest.raises(ValueError, match=r"^gram_loss: patch features of shapes \[2, 4, 8\] and \[2, 5, 8\]; both "
                                         r"must be \(crops, patches, dim\) and equal$"):
        gram_loss(torch.zeros(2, 4, 8), torch.zeros(2, 5, 8))


TINY_VIT = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2,
                       reg_tokens=2)
HEADS = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "local_crops_number": 2, "local_crops_size": 16}


def _crops(batch: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.randn(batch, 3, s, s, generator=g) for s in (32, 32, 16, 16)]


@pytest.mark.parametrize("objective", ["dino", "dinov2"])
def test_the_gram_teacher_is_the_starting_backbone_frozen_and_off_costs_no_copy(objective):
    config = DINOConfig if objective == "dino" else partial(DINOv2Config, ibot_loss_weight=0.0,  # no masks
                                                            koleo_loss_weight=0.0)
    torch.manual_seed(0)
    off = OBJECTIVES[objective](config(**HEADS), build_backbone(TINY_VIT))
    assert off.gram_teacher is None and not any(k.startswith("gram_teacher.") for k in off.state_dict())
    assert "gram_loss" not in off.eval()({"image": _crops()}, 0)

    torch.manual_seed(0)
    model = OBJECTIVES[objective](config(**HEADS, gram_loss_weight=2.0), build_backbone(TINY_VIT))
    assert _equal(model.gram_teacher.state_dict(), model.backbone.state_dict())
    assert not any(p.requires_grad for p in model.gram_teacher.parameters())
    assert {id(p) for g in model.param_groups(0.05, 0.5, 0.7) for p in g["params"]}.isdisjoint(
        id(p) for p in model.gram_teacher.parameters())
    assert not model.train().gram_teacher.training  # no drop-path in the anchor
    assert model.export_backbone() is not model.gram_teacher
    # the student sees the global crops as the anchor does (eval: no drop-path): nothing to pull back yet
    assert model.eval()({"image": _crops()}, 0)["gram_loss"].item() == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        for param in model.backbone.blocks.parameters():
            param.add_(0.05 * torch.randn_like(param))
    out = model({"image": _crops()}, 0)
    globals_ = torch.cat(_crops()[:2])
    prefix = model.backbone.num_prefix_tokens
    expected = _naive_gram(model.backbone.forward_features(globals_)[:, prefix:].detach(),
                           model.gram_teacher.forward_features(globals_)[:, prefix:])
    assert out["gram_loss"].item() == pytest.approx(expected, rel=1e-4)
    assert out["loss"].item() == pytest.approx((out["dino_loss"] + 2.0 * out["gram_loss"]).item(), rel=1e-5)


@pytest.mark.parametrize("objective", ["dino", "dinov2"])
def test_a_run_with_gram_anchoring_trains_logs_it_and_resumes_bit_identically(tmp_path, shards, watch,
                                                                              crash_in_step, objective):
    args = [f"{objective}.gram_loss_weight=1.0", "train.total_steps=4", "train.save_every=2", "train.export=true"]
    straight = tmp_path / "straight"
    seen = watch(OBJECTIVES[objective])
    pretrain(load_config(None, _args(objective, shards, straight, *args)))
    start = seen["start"]
    logged = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4]
    gram = [r["train/gram_loss"] for r in logged]
    assert all(g >= 0 for g in gram) and gram[-1] > 0  # the student moved away from the anchor, which pulls back
    final = load_file(straight / "checkpoints" / "step_00000004" / "model.safetensors")
    assert _equal(_part(final, "gram_teacher."), _part(start, "backbone."))  # neither trained nor EMA-updated
    assert not _equal(_part(final, "backbone."), _part(start, "backbone."))
    exported = load_file(straight / "backbone.safetensors")
    assert _equal(exported, _part(final, "teacher.backbone."))  # the export is the EMA teacher, not the anchor

    resumed = load_config(None, _args(objective, shards, tmp_path / "resumed", *args))
    with crash_in_step(OBJECTIVES[objective], 3):
        pretrain(resumed)
    pretrain(resumed)
    assert _equal(load_file(tmp_path / "resumed" / "checkpoints" / "step_00000004" / "model.safetensors"), final)
