"""Config value checks: ranges, choices, finite numbers and what timm would assert, each a one-line error naming
the key, at load."""

import math
import re

import pytest

from ssl_vit.config.finetune import load_finetune_config
from ssl_vit.config.pretrain import ConfigError, load_config


@pytest.mark.parametrize("override, message", [
    ("train.log_every=0", "train.log_every: must be at least 1, got 0"),  # not 'never': it divided by zero
    ("train.save_every=-1", "train.save_every: must be at least 0 (0: only at the end), got -1"),
    ("data.num_workers=-2", "data.num_workers: must be at least 0 (0: load in the training process), got -2"),
    ("train.seed=-1", "train.seed: must be in [0, 4294967295], got -1"),  # was a ValueError from numpy in training
])
def test_step_intervals_and_counts_out_of_range_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message
    if override.startswith(("train.log_every", "train.seed")):
        with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
            load_finetune_config(None, [override])


def test_value_checks():
    with pytest.raises(ConfigError, match="train.precision: 'fp8' is not one of"):
        load_config(None, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="unknown|not one of"):
        load_config(None, ["objective=simclr"])
    with pytest.raises(ConfigError, match="not a multiple of model.patch_size"):
        load_config(None, ["model.img_size=30", "model.patch_size=4"])


@pytest.mark.parametrize("override, message", [
    # accepted before, then trained wrongly (NaN losses, gradient ascent, a ZeroDivisionError, ...)
    ("mae.mask_ratio=0", "mae.mask_ratio: must be in (0, 1), got 0.0"),
    ("optim.clip_grad=-1", "optim.clip_grad: must be greater than 0 (or null: no clipping), got -1.0"),
    ("optim.clip_grad=0", "optim.clip_grad: must be greater than 0 (or null: no clipping), got 0.0"),
    ("optim.lr=-1", "optim.lr: must be greater than 0 (or null: base_lr × global batch / 256), got -1.0"),
    ("optim.lr=.nan", "optim.lr: must be a finite number, got nan"),
    ("optim.lr=inf", "optim.lr: must be a finite number, got inf"),
    ("optim.weight_decay=-1", "optim.weight_decay: must be at least 0, got -1.0"),
    ("optim.betas=[0.9, 1.5]", "optim.betas: each must be in [0, 1), got [0.9, 1.5]"),
    ("model.depth=0", "model.depth: must be at least 1 (or null: the timm model's own), got 0"),
    ("data.max_skip_rate=2", "data.max_skip_rate: must be in [0, 1], got 2.0"),
    ("data.max_skip_rate=-0.1", "data.max_skip_rate: must be in [0, 1], got -0.1"),
    ("model.patch_size=0", "model.patch_size: must be at least 1, got 0"),
    ("model.patch_size=-8", "model.patch_size: must be at least 1, got -8"),
    ("model.img_size=0", "model.img_size: must be at least 1, got 0"),
    ("model.drop_path_rate=1", "model.drop_path_rate: must be in [0, 1), got 1.0"),
    ("mae.decoder_dim=0", "mae.decoder_dim: must be at least 1, got 0"),
    ("mae.decoder_heads=5", "mae.decoder_heads: 5 heads do not divide mae.decoder_dim 512 evenly"),
    ("mae.crop_scale=[0.9, 0.2]", "mae.crop_scale: must be [min, max] with 0 < min <= max <= 1, got [0.9, 0.2]"),
    ("eval.knn_k=0", "eval.knn_k: must be at least 1, got 0"),
    ("eval.knn_temperature=0", "eval.knn_temperature: must be greater than 0, got 0.0"),
    ("eval.batch_size=0", "eval.batch_size: must be at least 1, got 0"),
    ("eval.crop_ratio=0", "eval.crop_ratio: must be in (0, 1], got 0.0"),
    ("eval.knn_val=/data/val", "eval.knn_train: empty while eval.knn_val is set; k-NN needs both (or neither)"),
    ("train.run_dir=", "train.run_dir: must not be empty (it would write the run into the current directory)"),
    ("dino.grayscale_prob=1.2", "dino.grayscale_prob: must be in [0, 1], got 1.2"),
    ("dino.out_dim=1", "dino.out_dim: must be at least 2, got 1"),
    ("dino.center_momentum=1", "dino.center_momentum: must be in [0, 1), got 1.0"),
])
def test_values_that_would_train_wrongly_or_crash_late_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


@pytest.mark.parametrize("overrides, message", [
    (["model.embed_dim=128", "model.num_heads=5"], "model.num_heads: 5 heads do not divide model.embed_dim 128 evenly"),
    # one of them null: the timm model's own value (vit_base: 768 wide) is what the build would use
    (["model.num_heads=5"], "model.num_heads: 5 heads do not divide model.embed_dim 768 evenly"),
    (["objective=dino", "model.img_size=32", "model.patch_size=4", "dino.local_crops_size=96"],
     "dino.local_crops_size: must be at most model.img_size 32 (local crops are the small ones), got 96"),
])
def test_architecture_that_timm_would_assert_on_is_refused_by_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value) == message


def test_a_mae_run_ignores_the_dino_local_crop_size():
    # the MAE demo's 32 px images with DINO's default 96 px local crops: the local crops are never made
    assert load_config(None, ["model.img_size=32", "model.patch_size=4"]).dino.local_crops_size == 96


def test_warmup_as_long_as_the_run_is_named_but_loads():
    from ssl_vit.config.pretrain import doubtful_settings

    # a smoke test (total_steps=2 of a recipe) or a run to be extended on resume: not refused, not silent
    cfg = load_config(None, ["train.warmup_steps=50", "train.total_steps=2"])
    assert doubtful_settings(cfg) == ["train.warmup_steps 50 >= train.total_steps 2: the lr never gets out of "
                                      "warmup (it stays below its peak for the whole run)"]
    assert doubtful_settings(load_config(None, ["train.warmup_steps=1", "train.total_steps=2"])) == []


@pytest.mark.parametrize("override, message", [
    ("augment.mixup=-1", "augment.mixup: must be at least 0, got -1.0"),
    ("augment.reprob=2", "augment.reprob: must be in [0, 1], got 2.0"),
    ("augment.smoothing=1.5", "augment.smoothing: must be in [0, 1), got 1.5"),
    ("augment.crop_scale=[2, 3]", "augment.crop_scale: must be [min, max] with 0 < min <= max <= 1, got [2.0, 3.0]"),
    ("optim.lr=-1", "optim.lr: must be greater than 0 (or null: base_lr × global batch / 256), got -1.0"),
    ("data.num_classes=0",
     "data.num_classes: must be at least 1 (or null: lines of classes.txt beside the train or val shards), got 0"),
    ("data.train_size=0", "data.train_size: must be at least 1 (or null: counted from the tar headers), got 0"),
    ("model.drop_path_rate=1.5", "model.drop_path_rate: must be in [0, 1), got 1.5"),
    ("optim.layer_decay=0", "optim.layer_decay: must be in (0, 1], got 0.0"),
    ("train.max_steps=0", "train.max_steps: must be at least 1 (or null for every epoch), got 0"),
    ("train.keep_last=-1", "train.keep_last: must be at least 0 (0: keep all), got -1"),
    ("train.run_dir= ", "train.run_dir: must not be empty (it would write the run into the current directory)"),
    ("augment.auto_augment=bogus", "augment.auto_augment: timm does not accept 'bogus' (Unknown AA policy bogus); "
                                   "give a timm policy such as 'rand-m9-mstd0.5-inc1', or '' for none"),
    ("augment.auto_augment=randx", "augment.auto_augment: timm does not accept 'randx'; give a timm policy such as "
                                   "'rand-m9-mstd0.5-inc1', or '' for none"),
])
def test_fine_tuning_values_out_of_range_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_finetune_config(None, [override])
    assert str(err.value) == message


def test_timm_policies_of_every_family_are_accepted():
    for policy in ("rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "v0", "original", ""):
        assert load_finetune_config(None, [f"augment.auto_augment={policy}"]).augment.auto_augment == policy


# Issue #20: settings derived from the patch grid that no run can train with, refused at load, not after the run
# dir is written (0 visible patches trained with rc 0; a crop smaller than the patch failed in timm's assert).
MAE_DEMO = ["model.img_size=32", "model.patch_size=4"]  # an 8x8=64-patch grid
DINO_DEMO = ["objective=dino", "model.img_size=32", "model.patch_size=8", "dino.local_crops_size=16"]


@pytest.mark.parametrize("overrides, message", [
    ([*MAE_DEMO, "mae.mask_ratio=0.99"],
     "mae.mask_ratio=0.99 leaves no visible patch of the 8x8=64-patch grid: the highest usable ratio is 0.984375"),
    (["model.img_size=16", "model.patch_size=8", "mae.mask_ratio=0.8"],
     "mae.mask_ratio=0.8 leaves no visible patch of the 2x2=4-patch grid: the highest usable ratio is 0.75"),
    ([*MAE_DEMO, "mae.mask_ratio=1e-17"],
     "mae.mask_ratio=1e-17 hides no patch of the 8x8=64-patch grid (the loss is over hidden patches): "
     "hide at least one, 0.015625"),
    ([*DINO_DEMO, "dino.local_crops_size=4"],
     "dino.local_crops_size: must be a multiple of model.patch_size 8 (the ViT cuts each crop into whole "
     "patches), got 4"),
    ([*DINO_DEMO, "dino.local_crops_size=12"],
     "dino.local_crops_size: must be a multiple of model.patch_size 8 (the ViT cuts each crop into whole "
     "patches), got 12"),
    (["objective=dino", "model.img_size=8", "model.patch_size=16"],  # the global crops: smaller than the patch
     "model.img_size 8 is not a multiple of model.patch_size 16"),
    (["model.img_size=16", "model.patch_size=16"],
     "model.patch_size: a 1x1=1-patch grid leaves MAE no patch to hide besides the one it sees; use a smaller patch "
     "or a larger model.img_size"),
    (["model.embed_dim=130", "model.num_heads=2"],  # MAE's fixed encoder position embedding
     "model.embed_dim: MAE's sin-cos position embedding needs a multiple of 4, got 130"),
])
def test_settings_the_patch_grid_can_never_train_are_refused_at_load(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert str(err.value) == message


def test_the_usable_mask_ratio_boundary_is_the_one_mae_masks_with():
    from ssl_vit.config.pretrain import usable_mask_ratios
    from ssl_vit.methods.mae.model import random_masking

    for grid in (2, 3, 7, 8, 14, 16, 37):
        length = grid * grid
        low, high = usable_mask_ratios(length)
        for ratio, kept in ((high, True), (math.nextafter(high, 2), False)):
            assert (random_masking(1, length, ratio)[0].shape[1] >= 1) == kept, (grid, ratio)
        assert random_masking(1, length, low)[1].sum() >= 1  # hides at least one patch
    assert load_config(None, [*MAE_DEMO, "mae.mask_ratio=0.984375"]).mae.mask_ratio == 0.984375


def test_grid_checks_follow_the_objective():
    # DINO never masks and MAE never makes local crops: each ignores the other's setting
    assert load_config(None, [*DINO_DEMO, "mae.mask_ratio=0.99"]).mae.mask_ratio == 0.99
    assert load_config(None, [*MAE_DEMO, "dino.local_crops_size=6"]).dino.local_crops_size == 6
    assert load_config(None, ["objective=dino", "model.embed_dim=130", "model.num_heads=2"]).model.embed_dim == 130


@pytest.mark.parametrize("override, message", [
    ("data.num_classes=1", "data.num_classes: 1 class leaves nothing to tell apart (the loss is 0 whatever the "
                           "image); give at least 2, or null for classes.txt"),
])
def test_fine_tuning_settings_that_can_never_train_are_refused_at_load(override, message):
    with pytest.raises(ConfigError) as err:
        load_finetune_config(None, [override])
    assert str(err.value) == message


def test_the_cli_refuses_a_grid_setting_in_one_line_before_the_run_dir(tmp_path, capsys):
    from ssl_vit.cli.main import main

    run_dir = tmp_path / "run"
    assert main(["pretrain", "mae_demo_tiny", "--set", "mae.mask_ratio=0.99",
                 "--set", f"train.run_dir={run_dir}"]) == 2
    assert capsys.readouterr().err.strip() == (
        "ssl-vit pretrain: error: mae.mask_ratio=0.99 leaves no visible patch of the 8x8=64-patch grid: the highest "
        "usable ratio is 0.984375")
    assert not run_dir.exists()
