"""Fine-tuning through the training loop: two steps with every augmentation on, the best model loads back in plain
timm; a stop and a rerun equal one uninterrupted run; NaN steps are skipped; its config."""

import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import timm
import torch
import webdataset as wds
from accelerate import Accelerator
from safetensors.torch import load_file

import ssl_vit.eval.finetune as ft
import ssl_vit.eval.labelled as labelled
import ssl_vit.methods.classify.model as classify
from ssl_vit.cli.main import main
from ssl_vit.config.finetune import FinetuneConfig, FTModelConfig, load_finetune_config
from ssl_vit.config.pretrain import ConfigError
from ssl_vit.data.demo import ensure_demo_data
from ssl_vit.data.samples import SKIP_REASONS
from ssl_vit.data.shard_urls import resolve_shards
from ssl_vit.data.writer import write_samples
from ssl_vit.methods.classify.layer_decay import param_groups_lrd
from ssl_vit.methods.classify.model import posterize_any_bits, train_transform
from ssl_vit.training.checkpoint import complete_checkpoints, export_backbone, load_backbone

ROOT = Path(__file__).resolve().parent.parent
KW = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=0, dynamic_img_size=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    demo = ensure_demo_data(root / "demo", n_train=8, n_knn_train=24, n_knn_val=10)
    torch.manual_seed(0)
    export_backbone(timm.create_model("vit_tiny_patch16_224", **KW), root / "bb", "vit_tiny_patch16_224", KW)
    return demo, root / "bb"


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_classifier_keeps_every_backbone_weight(setup, pool):
    _, backbone = setup
    model, name, kwargs = classify.build_classifier(FTModelConfig(backbone=str(backbone), pool=pool), num_classes=7)
    vit, _ = load_backbone(backbone)
    state = model.state_dict()
    for key, value in vit.state_dict().items():
        if pool == "avg" and key.startswith("norm."):
            assert key not in state  # MAE's global pool: the final norm becomes a fresh fc_norm after pooling
        else:
            assert torch.equal(state[key], value), key
    assert model.head.out_features == 7 and kwargs["global_pool"] == ("avg" if pool == "avg" else "token")
    assert float(model.head.weight.detach().std()) < 1e-4 and not model.head.bias.any()  # MAE's head init, std 2e-5


def test_finetune_two_steps_every_augmentation_then_timm_loads_it(tmp_path, setup, monkeypatch):
    demo, backbone = setup
    targets = []  # what the loss was given
    real_loss = classify.SoftTargetCrossEntropy.forward
    monkeypatch.setattr(classify.SoftTargetCrossEntropy, "forward",
                        lambda self, x, target: targets.append(target.detach().clone()) or real_loss(self, x, target))
    # val: the demo's 10 images and a shard of 3 corrupt ones, which are left out and reported
    write_samples(({"__key__": f"bad{i}", "png": b"not a png", "cls": b"1"} for i in range(3)), tmp_path, "bad")
    val = tmp_path / "val.txt"
    val.write_text("\n".join([*resolve_shards(demo.knn_val), str(tmp_path / "bad-000000.tar")]))
    cfg = load_finetune_config(ROOT / "recipes" / "finetune_demo_tiny.yaml", [
        f"model.backbone={backbone}", f"data.train={demo.knn_train}", f"data.val={val}",
        "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8", "train.max_steps=2",
        "train.log_every=1", f"train.run_dir={tmp_path / 'run'}"])
    aug = cfg.augment  # every augmentation on: RandAugment, random erasing, mixup + cutmix, smoothing, drop path
    assert aug.auto_augment and aug.reprob > 0 and aug.mixup > 0 and aug.cutmix > 0 and aug.smoothing > 0
    assert cfg.model.drop_path_rate > 0 and cfg.optim.layer_decay < 1
    names = repr(train_transform(aug, 32))
    assert "RandAugment" in names and "RandomErasing" in names and "RandomResizedCrop" in names

    result = ft.finetune(cfg, Accelerator())
    assert result.step == 2 and [t.shape for t in targets] == [(4, 10)] * 2
    # soft targets, mixed: smoothing alone gives each row one `on` value and `off` elsewhere
    off, on = aug.smoothing / 10, 1 - aug.smoothing + aug.smoothing / 10
    assert all(torch.allclose(t.sum(dim=1), torch.ones(4)) for t in targets)
    assert [v for t in targets for v in t.flatten().tolist() if min(abs(v - off), abs(v - on)) > 1e-4]
    run = tmp_path / "run"
    summary = json.loads((run / "finetune.json").read_text())
    assert summary["num_classes"] == 10 and summary["n_train"] == 24 and summary["best"]["n"] == 10
    assert summary["skipped"]["val"] == {**dict.fromkeys(SKIP_REASONS, 0), "corrupt_image": 3}
    assert summary["skipped"]["train"] == dict.fromkeys(SKIP_REASONS, 0)
    assert [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()] == [1, 2, 2]

    # The best model, head included, loads in plain timm and gives the same logits.
    meta = json.loads((run / "best" / "backbone.json").read_text())
    assert meta["model_kwargs"]["num_classes"] == 10 and meta["step"] == 2
    weights = load_file(run / "best" / "backbone.safetensors")
    plain = timm.create_model(meta["model_name"], **meta["model_kwargs"]).eval()
    plain.load_state_dict(weights, strict=True)
    overlay = timm.create_model(meta["model_name"], pretrained=True, **meta["model_kwargs"],
                                pretrained_cfg_overlay=dict(file=str(result.exported), num_classes=10,
                                                            custom_load=False)).eval()
    ours, _ = load_backbone(run / "best")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(plain(x), ours.eval()(x)) and torch.equal(overlay(x), plain(x))
    assert plain(x).shape == (2, 10)

    # A rerun of the finished run resumes from its last checkpoint and leaves its results as they are; without
    # its checkpoints, the results would be overwritten: refused before anything is written.
    results = ("best/backbone.safetensors", "best/backbone.json", "finetune.json", "log.jsonl")
    before = {name: (run / name).read_bytes() for name in results}
    again = ft.finetune(cfg, Accelerator())
    assert again.step == 2 and again.best == result.best
    assert {name: (run / name).read_bytes() for name in results} == before
    shutil.rmtree(run / "checkpoints")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"holds a fine-tuning result \(best, finetune.json\) but no checkpoint to "
                                         "resume from"):
        ft.finetune(cfg, Accelerator())
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    missing = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=str(tmp_path / "nope.tar")),
                                  train=dataclasses.replace(cfg.train, run_dir=str(tmp_path / "run2")))
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        ft.finetune(missing, Accelerator())
    assert not (tmp_path / "run2").exists()


def test_val_shards_that_do_not_fit_the_train_classes_are_refused(tmp_path, setup):
    demo, backbone = setup
    first = resolve_shards(demo.knn_val)[0]
    png = next(iter(wds.WebDataset(first, shardshuffle=False)))["png"]
    other = tmp_path / "other"
    write_samples(({"__key__": f"v{i}", "png": png, "cls": b"12"} for i in range(2)), other, "val")

    def run(name: str) -> None:
        cfg = load_finetune_config(ROOT / "recipes" / "finetune_demo_tiny.yaml", [
            f"model.backbone={backbone}", f"data.train={demo.knn_train}", f"data.val={other}",
            "data.batch_size=4", "data.num_workers=0", "train.max_steps=1", f"train.run_dir={tmp_path / name}"])
        ft.finetune(cfg, Accelerator())

    (other / "classes.txt").write_text("only\ntwo\n")
    with pytest.raises(ValueError, match="train and val shards list different classes"):
        run("a")
    assert not (tmp_path / "a").exists()
    (other / "classes.txt").unlink()  # no list to compare: the label 12 is checked against the model's 10 classes
    with pytest.raises(ValueError, match=r"fine-tuning val labels must be < the 10 classes of the model: 2 of 2 "
                                         r"samples have a larger one \(up to 12\)"):
        run("b")


def test_a_huge_train_label_is_a_one_line_error_naming_the_sample(tmp_path, setup):
    demo, _ = setup
    png = next(iter(wds.WebDataset(resolve_shards(demo.knn_val)[0], shardshuffle=False)))["png"]
    write_samples(({"__key__": f"t{i}", "png": png, "cls": b"1000000000000"} for i in range(8)), tmp_path / "t")
    cfg = tiny_cfg(setup, tmp_path / "run", f"data.train={tmp_path / 't'}", "train.max_steps=1")
    with pytest.raises(ValueError, match=r"^fine-tuning needs labels in \[0, 10\) on every train sample: sample "
                                         r"'t\d' has 1000000000000$"):  # the 10 classes of the val classes.txt
        ft.finetune(cfg, Accelerator())


def test_randaugment_posterize_to_zero_bits_gives_black_not_an_error():
    from PIL import Image
    from timm.data.auto_augment import RandAugment

    transform = train_transform(FinetuneConfig().augment, 32)
    ops = [op for step in transform.transforms if isinstance(step, RandAugment) for op in step.ops]
    posterize = [op for op in ops if "Posterize" in op.name]
    assert posterize and all(op.aug_fn is posterize_any_bits for op in posterize)
    img = Image.new("RGB", (8, 8), (200, 100, 50))
    assert posterize_any_bits(img, 0).getextrema() == ((0, 0),) * 3
    assert posterize_any_bits(img, 1).getpixel((0, 0)) == (128, 0, 0)


def test_finetune_config_is_closed_and_the_recipes_load():
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.layer_decy'; did you mean 'optim.layer_decay'"):
        load_finetune_config(None, ["optim.layer_decy=0.7"])
    with pytest.raises(ConfigError, match="must be even"):
        load_finetune_config(None, ["data.batch_size=3"])
    base = load_finetune_config(ROOT / "recipes" / "finetune_vit_base_p16.yaml")
    # MAE's ViT-B fine-tuning (FINETUNE.md, main_finetune.py)
    assert (base.optim.base_lr, base.optim.layer_decay, base.optim.weight_decay) == (5e-4, 0.65, 0.05)
    assert (base.train.epochs, base.train.warmup_epochs, base.model.drop_path_rate) == (100, 5, 0.1)
    assert (base.augment.mixup, base.augment.cutmix, base.augment.smoothing, base.augment.reprob) == (0.8, 1, 0.1, 0.25)
    assert base.augment.auto_augment == "rand-m9-mstd0.5-inc1" and base.optim.betas == (0.9, 0.999)
    assert base.data.batch_size * 32 == 1024
    large = load_finetune_config(ROOT / "recipes" / "finetune_vit_large_p16.yaml")
    assert (large.optim.base_lr, large.optim.layer_decay, large.model.drop_path_rate) == (1e-3, 0.75, 0.2)
    load_finetune_config(ROOT / "recipes" / "finetune_demo_tiny.yaml")


def test_every_finetune_key_is_documented():
    doc = (ROOT / "docs" / "evaluation.md").read_text()
    keys = [f"{section.name}.{f.name}" for section in dataclasses.fields(FinetuneConfig)
            for f in dataclasses.fields(section.default_factory())]
    missing = [k for k in keys if f"`{k}`" not in doc]
    assert not missing, f"docs/evaluation.md does not list {missing}"


def mae_lr_scale_and_wd(name, param, num_blocks, decay, weight_decay):
    """MAE's layer-wise lr decay, restated: the stem (cls and pos tokens, patch embedding) is layer 0, block i layer
    i + 1, the rest (final norm, head) layer num_blocks + 1, scaled by decay ** (num_blocks + 1 - layer); no weight
    decay on biases, norms and the two tokens."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        layer = 0
    elif name.startswith("blocks."):
        layer = int(name.split(".")[1]) + 1
    else:
        layer = num_blocks + 1
    no_decay = param.ndim == 1 or name in ("cls_token", "pos_embed")
    return decay ** (num_blocks + 1 - layer), 0.0 if no_decay else weight_decay


def assert_mae_layer_decay(model, groups, decay, weight_decay, key="lr_scale"):
    """Per parameter of `model`, the lr scale (`key` of its group) and weight decay of MAE's layer-wise lr decay."""
    scale = {name: g[key] for g in groups for name in g["param_names"]}
    wd = {name: g["weight_decay"] for g in groups for name in g["param_names"]}
    params = dict(model.named_parameters())
    assert sorted(scale) == sorted(params) and sum(len(g["param_names"]) for g in groups) == len(params)
    for name, param in params.items():
        expected_scale, expected_wd = mae_lr_scale_and_wd(name, param, len(model.blocks), decay, weight_decay)
        assert scale[name] == pytest.approx(expected_scale), name
        assert wd[name] == expected_wd, name
    return scale


@pytest.mark.parametrize("pool", ["avg", "cls"])
def test_layer_decay_scales_match_mae_per_parameter(setup, pool):
    _, backbone = setup
    model, _, _ = classify.build_classifier(FTModelConfig(backbone=str(backbone), pool=pool), num_classes=7)
    scales = assert_mae_layer_decay(model, param_groups_lrd(model, 0.05, model.no_weight_decay(), 0.65), 0.65, 0.05)
    head_side = ["head.weight", "head.bias"] + (["fc_norm.weight"] if pool == "avg" else ["norm.weight"])
    assert all(scales[n] == 1.0 for n in head_side)  # the final norm / fc_norm and head: the full lr
    assert scales["blocks.1.norm1.weight"] == pytest.approx(0.65) and scales["pos_embed"] == pytest.approx(0.65 ** 3)


def test_finetune_optimizer_uses_mae_layer_decay_with_cls_pool(tmp_path, setup):
    # the optimizer a run steps: its groups' lrs (scheduled lr × scale) and weight decays as saved after step 2
    cfg = tiny_cfg(setup, tmp_path / "run", "model.pool=cls", "train.max_steps=2")
    ft.finetune(cfg, Accelerator())
    groups = torch.load(tmp_path / "run" / "checkpoints" / "step_00000002" / "optimizer.bin",
                        weights_only=True)["param_groups"]
    head_lr = next(g["lr"] for g in groups if "head.weight" in g["param_names"])
    assert head_lr > 0
    relative = [{**g, "lr": g["lr"] / head_lr} for g in groups]
    model, _, _ = classify.build_classifier(cfg.model, num_classes=10)
    scales = assert_mae_layer_decay(model, relative, cfg.optim.layer_decay, cfg.optim.weight_decay, key="lr")
    assert scales["norm.weight"] == scales["norm.bias"] == 1.0  # timm's groups gave it the last block's decay


def test_zero_max_steps_is_a_one_line_error(tmp_path, setup, capsys):
    demo, backbone = setup
    argv = ["finetune", "--set", f"model.backbone={backbone}", "--set", f"data.train={demo.knn_train}",
            "--set", f"data.val={demo.knn_val}", "--set", "train.max_steps=0", "--set", f"train.run_dir={tmp_path}"]
    assert main(argv) == 2  # was a KeyError traceback: no step, so no evaluation and no best score
    err = capsys.readouterr().err
    assert err == "ssl-vit finetune: error: train.max_steps: must be at least 1 (or null for every epoch), got 0\n"


def tiny_overrides(setup, run_dir, *extra):
    demo, backbone = setup
    return [f"model.backbone={backbone}", f"data.train={demo.knn_train}", f"data.val={demo.knn_val}",
            "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8", "train.log_every=1",
            f"train.run_dir={run_dir}", *extra]


def tiny_cfg(setup, run_dir, *extra):
    return load_finetune_config(ROOT / "recipes" / "finetune_demo_tiny.yaml", tiny_overrides(setup, run_dir, *extra))


def test_a_second_finetune_into_a_held_run_dir_is_refused_naming_the_holder(tmp_path, setup):
    from types import SimpleNamespace

    from ssl_vit.training.run_dir import hold_run_dir

    cfg = tiny_cfg(setup, tmp_path / "run", "train.max_steps=1")
    with hold_run_dir(tmp_path / "run", SimpleNamespace(is_main_process=True, num_processes=1)):  # another run
        with pytest.raises(ValueError, match=rf"^train.run_dir {tmp_path / 'run'} is in use by another run \(pid "
                                             rf"{os.getpid()}\); wait for it to end or set another train.run_dir$"):
            ft.finetune(cfg)
    assert ft.finetune(cfg).step == 1  # released on exit


def test_a_finetuning_step_reads_the_device_once(tmp_path, setup, monkeypatch):
    # A host read of a device value (item, float, bool, tolist) stalls a GPU until its queue drains. A step reads
    # once, as a pretraining step does: the agreed stop/skip flags. The labels are checked on the CPU before their
    # copy; logs, evaluations and checkpoints (the loop's _after_step) read, but not in every step.
    import sys

    import ssl_vit.training.loop as loop

    reads: list[str] = []
    in_step = {"on": False}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(t, *a, _real=real, _name=name, **k):
            frame = sys._getframe(1)
            # CPU AdamW reads its step counters (a CPU tensor); fused AdamW on CUDA does not
            label_check = frame.f_code.co_filename == labelled.__file__ and frame.f_code.co_name == "checked_labels"
            if in_step["on"] and not label_check and f"torch{os.sep}optim" not in frame.f_code.co_filename:
                reads.append(f"{_name} {Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
            return _real(t, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    real_after, real_run = loop.Trainer._after_step, loop.Trainer.run

    def after_step(self, *args, **kwargs):
        in_step["on"] = False
        real_after(self, *args, **kwargs)
        in_step["on"] = True

    def run(self):
        in_step["on"] = True
        try:
            return real_run(self)
        finally:
            in_step["on"] = False
    monkeypatch.setattr(loop.Trainer, "_after_step", after_step)
    monkeypatch.setattr(loop.Trainer, "run", run)
    # one loader worker: the views' own reads happen there
    ft.finetune(tiny_cfg(setup, tmp_path / "run", "train.max_steps=4", "train.log_every=100", "optim.accum_steps=2",
                         "data.num_workers=1"), Accelerator())
    assert [r.split()[0] for r in reads] == ["tolist"] * 4, reads


def _losses(run_dir):
    return [(r["step"], r.get("train/loss"), r.get("val/top1"))
            for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())]


def test_a_stopped_finetune_resumes_to_the_uninterrupted_one(tmp_path, setup, monkeypatch, capsys):
    # 16 images of batch 4: 4 steps an epoch, 2 epochs. A SIGTERM at the end of step 5 is seen in step 6, which
    # then saves, off the epoch-end checkpoint grid: the rerun reads the stream again from step 4 and skips 2
    # batches (one loader worker: its random numbers are its own); the best score and history come back with it.
    extra = ["data.train_size=16", "train.epochs=2", "train.warmup_epochs=1", "data.num_workers=1"]
    straight = ft.finetune(tiny_cfg(setup, tmp_path / "straight", *extra), Accelerator())
    original = classify.Classify.after_step

    def stop_in_step_5(self, step):
        original(self, step)
        if step == 4:  # 0-based
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(classify.Classify, "after_step", stop_in_step_5)
    run = tmp_path / "resumed"
    argv = ["finetune", str(ROOT / "recipes" / "finetune_demo_tiny.yaml")]
    for kv in tiny_overrides(setup, run, *extra):
        argv += ["--set", kv]
    assert main(argv) == 0  # stopped cleanly
    out = capsys.readouterr().out
    assert f"stopped by SIGTERM after step 6; checkpoint: {run / 'checkpoints' / 'step_00000006'}" in out
    assert [s for s, _ in complete_checkpoints(run)] == [4, 6] and not (run / "finetune.json").exists()
    monkeypatch.setattr(classify.Classify, "after_step", original)
    assert main(argv) == 0
    assert f"resumed from {run / 'checkpoints' / 'step_00000006'} (step 6)" in capsys.readouterr().out

    a, b = (load_file(r / "checkpoints" / "step_00000008" / "model.safetensors") for r in (straight.run_dir, run))
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    assert _losses(run) == _losses(straight.run_dir)
    assert [s for s, _, top1 in _losses(run) if top1 is not None] == [4, 8]
    summary, expected = (json.loads((r / "finetune.json").read_text()) for r in (run, straight.run_dir))
    assert summary == expected and len(summary["history"]) == 2
    best, expected_best = (load_file(r / "best" / "backbone.safetensors") for r in (run, straight.run_dir))
    assert [k for k in best if not torch.equal(best[k], expected_best[k])] == []

    # the run dir is a fine-tuning run's: pretraining refuses to resume it; so is a resume with another model
    from ssl_vit.config.pretrain import load_config
    from ssl_vit.training.loop import pretrain

    demo, _ = setup
    with pytest.raises(ValueError, match=f"train.run_dir {run} holds a fine-tuning run, not a pretraining run's"):
        pretrain(load_config(None, [f"data.train={demo.train}", f"train.run_dir={run}"]))
    with pytest.raises(ValueError, match=r"^checkpoint .*step_00000008 was made with a different model \(.*\); "
                                         "resume with the run's own config"):
        ft.finetune(tiny_cfg(setup, run, *extra, "model.pool=cls"), Accelerator())


def test_a_nan_step_is_skipped_and_counted_and_too_many_abort(tmp_path, setup, monkeypatch):
    from ssl_vit.training.monitor import RunAborted

    original = classify.Classify.forward
    nan_steps = {1}

    def nan_at(self, batch, step):
        out = original(self, batch, step)
        return {**out, "loss": out["loss"] * float("nan")} if step in nan_steps else out

    monkeypatch.setattr(classify.Classify, "forward", nan_at)
    run = tmp_path / "run"
    ft.finetune(tiny_cfg(setup, run, "train.max_steps=3"), Accelerator())
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["train/nonfinite_steps"] for r in log if "train/loss" in r] == [0, 1, 1]
    assert [r["train/loss"] is None for r in log if "train/loss" in r] == [False, True, False]
    # AdamW stepped twice in three steps: the NaN step's update was skipped
    opt_state = torch.load(run / "checkpoints" / "step_00000003" / "optimizer.bin", weights_only=True)
    assert {float(s["step"]) for s in opt_state["state"].values()} == {2.0}

    nan_steps.update(range(100))
    with pytest.raises(RunAborted, match=r"^2 consecutive steps had a NaN/inf loss or gradient norm \(up to step 2\); "
                                         "last good checkpoint: none"):
        ft.finetune(tiny_cfg(setup, tmp_path / "diverged", "train.max_steps=5", "train.max_nonfinite_steps=2"),
                    Accelerator())


def test_a_finetune_after_the_augmented_probe_on_one_accelerator_saves_and_resumes_its_own_model(tmp_path, setup):
    # The Python API may run the augmented probe (which prepares its heads) and then fine-tune on one Accelerator:
    # the fine-tuning checkpoint must hold the classifier only, or its resume is refused.
    from ssl_vit.eval.features import FeatureSpec
    from ssl_vit.eval.linear import ProbeData, ProbeProtocol
    from ssl_vit.eval.linear_probe import linear_probe

    demo, backbone = setup
    acc = Accelerator()
    proto = ProbeProtocol(FeatureSpec(), batchnorm=False, optimizer="sgd", base_lrs=(0.1,), weight_decays=(0.0,),
                          epochs=1, warmup_epochs=0, batch_size=8)
    data = ProbeData(demo.knn_train, demo.knn_val, batch_size=8, num_workers=0, crop_ratio=1.0, shuffle_buffer=8)
    linear_probe(load_backbone(backbone)[0], data, proto, acc, augment=True)
    ft.finetune(tiny_cfg(setup, tmp_path / "run", "train.max_steps=1"), acc)
    _, checkpoint = complete_checkpoints(tmp_path / "run")[-1]
    assert sorted(p.name for p in checkpoint.glob("model*.safetensors")) == ["model.safetensors"]
    assert ft.finetune(tiny_cfg(setup, tmp_path / "run", "train.max_steps=2"), acc).step == 2
