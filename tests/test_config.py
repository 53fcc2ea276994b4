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
    assert load_config(None, ["data.train={a,b}/x-{0..9}.tar"]).data.train == "{a,b}/x-{0..9}.tar"  # not YAML
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


@pytest.mark.parametrize("text, message", [
    ("train:\n  run_dir: 5\n", "train.run_dir: expected str, got 5 (int)"),  # OmegaConf alone would take '5'
    ("model: 5\n", "model: expected a mapping of ModelConfig fields, got 5"),
    ("mae:\n  crop_scale: [0.2, 0.5, 1]\n", "mae.crop_scale: expected a list of 2 values, got [0.2, 0.5, 1]"),
])
def test_a_recipe_value_of_the_wrong_type_names_the_key(tmp_path, text, message):
    with pytest.raises(ConfigError) as err:
        load_config(write(tmp_path, text))
    assert str(err.value) == message


def test_an_override_fixes_a_recipe_value_before_it_is_checked(tmp_path):
    recipe = write(tmp_path, "train:\n  precision: no\noptim:\n  betas: [0.9, 1e-3]\n")
    cfg = load_config(recipe, ["train.precision=bf16"])
    assert cfg.train.precision == "bf16" and cfg.optim.betas == (0.9, 1e-3)  # 1e-3 (no dot) is a float here too


@pytest.mark.parametrize("recipe, override, key, value", [
    ("train:\n  run_dir: ${oc.env:SSL_VIT_SECRET}\n", None, "train.run_dir", "${oc.env:SSL_VIT_SECRET}"),
    (None, "data.train=/d/${oc.env:SSL_VIT_SECRET}-{0..9}.tar", "data.train", "/d/${oc.env:SSL_VIT_SECRET}-{0..9}.tar"),
    (None, "optim.lr=${oc.env:SSL_VIT_SECRET}", "optim.lr", "${oc.env:SSL_VIT_SECRET}"),
    ("optim:\n  betas: [0.9, '${optim.base_lr}']\n", None, "optim.betas", "${optim.base_lr}"),
])
def test_omegaconf_interpolation_is_refused_in_recipes_and_overrides(tmp_path, monkeypatch, recipe, override, key,
                                                                      value):
    monkeypatch.setenv("SSL_VIT_SECRET", "0.5")  # resolved, it would load without a word
    with pytest.raises(ConfigError) as err:
        load_config(recipe and write(tmp_path, recipe), [override] if override else [])
    assert str(err.value) == (f"{key}: {value!r} is an interpolation (it could read the environment); "
                              "write the value itself")


def test_omegaconf_missing_marker_is_refused():
    with pytest.raises(ConfigError) as err:  # OmegaConf would keep the default in its place, without a word
        load_config(None, ["train.run_dir=???"])
    assert str(err.value) == "train.run_dir: '???' is 'missing' to OmegaConf; write the value itself"


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
    ("optim.betas=[a, 1]", "optim.betas[0]: expected float, got 'a' (str)"),
    ("optim=5", "optim: expected a mapping of OptimConfig fields, got '5'"),
])
def test_wrong_type_names_key_and_type(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert str(err.value) == message


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
    cfg = load_config(None, ["model.depth=3", "mae.crop_scale=[0.3, 0.9]", "optim.clip_grad=1.0",
                             "train.precision=no", "data.train=/d/{000..009}.tar", "train.run_dir=null"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg and isinstance(cfg.mae.crop_scale, tuple)
    from ssl_vit.config.finetune import load_finetune_config

    ft = load_finetune_config(None, ["data.num_classes=7", "augment.crop_scale=[0.2, 1]", "train.max_steps=null"])
    dump_config(ft, tmp_path / "finetune.yaml")
    assert load_finetune_config(tmp_path / "finetune.yaml") == ft


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
    from ssl_vit.config.schema import field_types

    text = render_reference()
    doc = Path(__file__).parent.parent / "docs" / "config.md"
    assert doc.read_text() == text, "docs/config.md is stale: run `python tools/config_reference.py`"
    for key in field_types(Config):
        row = next(line for line in text.splitlines() if line.startswith(f"| `{key}` |"))
        assert not row.endswith("|  |"), f"{key} has no comment in config.py"


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


def test_a_yaml_alias_bomb_is_refused_quickly(tmp_path):
    # 9 ** 8 values from 9 lines: walking or merging them hung (and would fill memory with a deeper file)
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]"
                                                       for i in range(1, 8)]
    recipe = write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as err:
        load_config(recipe)
    assert str(err.value) == f"{recipe}: not a recipe (its YAML aliases expand to over 100000 values)"
    from ssl_vit.cli.main import main

    assert main(["config", str(recipe)]) == 2  # the CLI first reads it to tell pretraining from fine-tuning
    anchored = load_config(write(tmp_path, "model:\n  depth: &two 2\n  num_heads: *two\n"))  # aliases still work
    assert (anchored.model.depth, anchored.model.num_heads) == (2, 2)
