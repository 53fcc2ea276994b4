"""Config: closed schema, helpful errors, overrides with type coercion, round trip through the run dir."""

from pathlib import Path

import pytest

from ssl_vit.config.pretrain import Config, ConfigError, dump_config, load_config


def write(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_mae_paper():
    cfg = load_config()
    assert cfg == Config()
    assert (cfg.mae.mask_ratio, cfg.mae.decoder_dim, cfg.mae.decoder_depth, cfg.mae.decoder_heads) == (0.75, 512, 8, 16)
    assert cfg.mae.norm_pix_loss and cfg.optim.betas == (0.9, 0.95)
    assert (cfg.optim.base_lr, cfg.optim.weight_decay) == (1.5e-4, 0.05)


def test_recipe_and_overrides(tmp_path):
    recipe = write(tmp_path, "model:\n  depth: 4\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(recipe, ["model.depth=2", "optim.weight_decay=0", "mae.crop_scale=[0.5, 1]",
                               "data.train=/d/train-{000000..000009}.tar", "model.embed_dim=null"])
    assert cfg.model.depth == 2 and cfg.optim.lr == 1e-3
    assert cfg.optim.weight_decay == 0.0 and isinstance(cfg.optim.weight_decay, float)
    assert cfg.mae.crop_scale == (0.5, 1.0)
    assert cfg.data.train == "/d/train-{000000..000009}.tar"  # a str key keeps braces verbatim
    assert cfg.model.embed_dim is None
    assert load_config(write(tmp_path, "optim:\n  lr: 1e-3\n"), ["optim.min_lr=2e-6"]).optim.lr == 1e-3


@pytest.mark.parametrize("source, message", [
    ("model:\n  dpeth: 4\n", "unknown config key 'model.dpeth'; did you mean 'model.depth'?"),
    ("optim:\n  base_rl: 1\n", "unknown config key 'optim.base_rl'; did you mean 'optim.base_lr'?"),
    ("mask_ratio: 0.5\n", "unknown config key 'mask_ratio'; did you mean 'mae.mask_ratio'?"),
])
def test_unknown_key_names_the_closest(tmp_path, source, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, source))
    assert str(err.value) == message


@pytest.mark.parametrize("override, suggestion", [
    ("optm.base_lr=1", "optim.base_lr"),
    ("trian.total_steps=1", "train.total_steps"),
    ("evl.knn_k=1", "eval.knn_k"),
    ("dat.batch_size=1", "data.batch_size"),
    ("evl.batch_size=1", "eval.batch_size"),  # the same leaf in two sections: the closer section wins
    ("optm.base_lrr=1", "optim.base_lr"),  # section and leaf both misspelled
])
def test_misspelled_section_names_the_full_key(override, suggestion):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == f"unknown config key {key!r}; did you mean {suggestion!r}?"


@pytest.mark.parametrize("override", ["train.batch_size=256", "batch_size=256"])
def test_a_leaf_of_two_sections_under_neither_names_both(override):
    # guessing one (eval's, by string distance) would send a user to the k-NN batch instead of training's
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == f"unknown config key {key!r}; did you mean 'data.batch_size' or 'eval.batch_size'?"


@pytest.mark.parametrize("override, message", [
    ("train.log_every=0", "train.log_every: must be at least 1, got 0"),  # not 'never': it divided by zero
    ("train.save_every=-1", "train.save_every: must be at least 0 (0: only at the end), got -1"),
    ("data.num_workers=-2", "data.num_workers: must be at least 0 (0: load in the training process), got -2"),
])
def test_step_intervals_and_counts_out_of_range_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message
    if override.startswith("train.log_every"):
        from ssl_vit.config.finetune import load_finetune_config

        with pytest.raises(ConfigError, match=f"^{message}$"):
            load_finetune_config(None, [override])


def test_a_bare_no_in_a_recipe_says_to_quote_it(tmp_path):
    with pytest.raises(ConfigError) as err:  # YAML reads `precision: no` as false
        load_config(write(tmp_path, "train:\n  precision: no\n"))
    assert str(err.value) == ("train.precision: expected str | None, got False (bool); a bare yes/no/on/off is a "
                              "bool in YAML: quote it ('no')")
    assert load_config(write(tmp_path, "train:\n  precision: 'no'\n")).train.precision == "no"


def test_misspelled_section_in_a_recipe(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, "optm:\n  base_lr: 1.0e-4\n  weight_decay: 0.1\n"))
    assert str(err.value) == "unknown config key 'optm.base_lr'; did you mean 'optim.base_lr'?"


def test_precision_unset_by_default_and_null_on_the_command_line():
    assert load_config().train.precision is None  # null: the launcher's --mixed_precision (distributed.py)
    assert load_config(None, ["train.precision=bf16", "train.precision=null"]).train.precision is None
    assert load_config(None, ["train.precision=no"]).train.precision == "no"


def test_unknown_override_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.totl_steps'; did you mean 'train.total_steps'\?"):
        load_config(None, ["train.totl_steps=5"])


@pytest.mark.parametrize("override, message", [
    ("model.depth=four", "model.depth: expected int | None, got 'four' (str)"),
    ("train.total_steps=1.5", "train.total_steps: expected int, got 1.5 (float)"),
    ("mae.norm_pix_loss=maybe", "mae.norm_pix_loss: expected bool, got 'maybe' (str)"),
    ("mae.crop_scale=[1]", "mae.crop_scale: expected a list of 2 values, got [1]"),
])
def test_wrong_type_names_key_and_type(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


def test_value_checks():
    with pytest.raises(ConfigError, match="train.precision: 'fp8' is not one of"):
        load_config(None, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="unknown|not one of"):
        load_config(None, ["objective=simclr"])
    with pytest.raises(ConfigError, match="not a multiple of model.patch_size"):
        load_config(None, ["model.img_size=30", "model.patch_size=4"])


def test_unsafe_yaml_is_refused(tmp_path):
    recipe = write(tmp_path, "model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not a valid YAML recipe"):
        load_config(recipe)


def test_missing_recipe(tmp_path):
    with pytest.raises(ConfigError, match="recipe not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_a_dump_killed_half_way_leaves_the_old_config_whole(tmp_path, monkeypatch):
    """A run dir's config.yaml is what export and resume rebuild the model from: never leave it torn."""
    path = tmp_path / "config.yaml"
    dump_config(load_config(None, ["model.depth=3"]), path)
    before = path.read_text()
    original = Path.write_text

    def dies_half_way(self, data, *args, **kwargs):
        original(self, data[: len(data) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        dump_config(load_config(None, ["model.depth=5"]), path)
    monkeypatch.undo()
    assert path.read_text() == before


def test_dump_round_trip(tmp_path):
    cfg = load_config(None, ["model.depth=3", "mae.crop_scale=[0.3, 0.9]", "optim.clip_grad=1.0"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_every_shipped_recipe_loads():
    from pathlib import Path

    recipes = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))
    assert recipes
    from ssl_vit.config.finetune import load_finetune_config

    for recipe in recipes:
        (load_finetune_config if recipe.name.startswith("finetune_") else load_config)(recipe)
        assert recipe.read_text().startswith("#"), f"{recipe.name} must start with a comment saying what it is"


def test_config_reference_is_current_and_complete():
    from pathlib import Path

    from ssl_vit.config.reference import render_reference
    from ssl_vit.config.schema import all_keys

    text = render_reference()
    doc = Path(__file__).parent.parent / "docs" / "config.md"
    assert doc.read_text() == text, "docs/config.md is stale: run `python tools/config_reference.py`"
    for key in all_keys(Config):
        row = next(line for line in text.splitlines() if line.startswith(f"| `{key}` |"))
        assert not row.endswith("|  |"), f"{key} has no comment in config.py"


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
    ("train.run_dir= ", "train.run_dir: must not be empty (it would write the run into the current directory)"),
    ("augment.auto_augment=bogus", "augment.auto_augment: timm does not accept 'bogus' (Unknown AA policy bogus); "
                                   "give a timm policy such as 'rand-m9-mstd0.5-inc1', or '' for none"),
    ("augment.auto_augment=randx", "augment.auto_augment: timm does not accept 'randx'; give a timm policy such as "
                                   "'rand-m9-mstd0.5-inc1', or '' for none"),
])
def test_fine_tuning_values_out_of_range_are_one_line_errors(override, message):
    from ssl_vit.config.finetune import load_finetune_config

    with pytest.raises(ConfigError) as err:
        load_finetune_config(None, [override])
    assert str(err.value) == message


def test_timm_policies_of_every_family_are_accepted():
    from ssl_vit.config.finetune import load_finetune_config

    for policy in ("rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "v0", "original", ""):
        assert load_finetune_config(None, [f"augment.auto_augment={policy}"]).augment.auto_augment == policy


def test_a_misspelled_key_in_another_case_names_the_key():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.IMG_SIZE=32"])
    assert str(err.value) == "unknown config key 'model.IMG_SIZE'; did you mean 'model.img_size'?"


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n"])
def test_an_empty_recipe_is_refused_naming_it(tmp_path, text):
    recipe = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert str(err.value) == f"{recipe}: the recipe is empty; it must set at least one key (docs/config.md lists them)"


def test_a_binary_recipe_is_refused_naming_it(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert str(err.value) == f"{recipe}: not a text YAML recipe (byte 0x89 at offset 0 is not UTF-8)"


@pytest.mark.parametrize("text, message", [
    ("objective: mae\nmodel:\n  depth: 2\nobjective: dino\n", "key 'objective' is set twice (lines 1 and 4)"),
    ("model:\n  depth: 2\n  embed_dim: 64\n  depth: 3\n", "key 'model.depth' is set twice (lines 2 and 4)"),
])
def test_a_key_given_twice_in_a_recipe_is_refused(tmp_path, text, message):
    recipe = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert str(err.value) == f"{recipe}: {message}; remove one"
