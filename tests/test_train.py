"""A short real training run: interrupted, resumed, exported, loaded strictly in timm, measured with k-NN."""

import json
import os
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from tiny_runs import TINY_MAE

from ssl_vit.config.pretrain import load_config
from ssl_vit.data.demo import ensure_demo_data
from ssl_vit.eval.knn import knn_report
from ssl_vit.methods.mae.model import MAE
from ssl_vit.training.checkpoint import complete_checkpoints, export_run, load_backbone
from ssl_vit.training.loop import pretrain
from ssl_vit.training.marker import write_marker

TINY = TINY_MAE + [
    "data.batch_size=8", "data.num_workers=0", "data.shuffle_buffer=16", "optim.lr=1e-3", "optim.clip_grad=1.0",
    "train.total_steps=6", "train.warmup_steps=2", "train.log_every=1", "train.image_every=3",
    "train.save_every=3", "train.keep_last=1", "eval.pool=avg", "eval.crop_ratio=1.0", "eval.num_workers=0",
    "eval.batch_size=32",
]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_data(tmp_path_factory.mktemp("demo"), n_train=64, n_knn_train=40, n_knn_val=20)


def test_interrupt_resume_export_timm_knn(tmp_path, demo, crash_in_step):
    run = tmp_path / "run"
    cfg = load_config(None, TINY + [f"data.train={demo.train}", f"train.run_dir={run}",
                                    f"eval.knn_train={demo.knn_train}", f"eval.knn_val={demo.knn_val}"])
    # First attempt dies during step 5 (after the step-3 checkpoint, before the step-6 one).
    with crash_in_step(MAE, 4):
        pretrain(cfg)
    assert [s for s, _ in complete_checkpoints(run)] == [3]

    # The same command again resumes from step 3 and finishes.
    result = pretrain(cfg)
    assert result.step == 6 and [s for s, _ in complete_checkpoints(run)] == [6]  # keep_last=1
    logged = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]  # step 4 of the dead attempt was dropped when the resume re-did it
    assert (run / "config.yaml").is_file() and any((run / "tensorboard").iterdir())
    rec = json.loads((run / "log.jsonl").read_text().splitlines()[-1])
    for key in ("train/loss", "train/lr", "perf/images_per_s", "perf/data_wait_share", "data/skipped_corrupt_image"):
        assert key in rec
    # The optimizer state came back from the checkpoint: AdamW counted all 6 steps, not 3.
    opt_state = torch.load(run / "checkpoints" / "step_00000006" / "optimizer.bin", weights_only=True)
    assert {float(s["step"]) for s in opt_state["state"].values()} == {6.0}

    # Export: encoder only, timm key names, loadable by timm itself, same features as our backbone.
    meta = json.loads((run / "backbone.json").read_text())
    weights = load_file(run / "backbone.safetensors")
    assert not any(k.startswith(("backbone.", "decoder.", "module.")) for k in weights)
    ours, _ = load_backbone(run)
    theirs = timm.create_model(meta["model_name"], pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(run / "backbone.safetensors"), custom_load=False),
                               **meta["model_kwargs"])
    fresh = timm.create_model(meta["model_name"], **meta["model_kwargs"])
    fresh.load_state_dict(weights, strict=True)
    # Hand-off for fine-tuning: a new head on top, every backbone weight loaded.
    finetune = timm.create_model(meta["model_name"], pretrained=True, **{**meta["model_kwargs"], "num_classes": 7},
                                 pretrained_cfg_overlay=dict(file=str(run / "backbone.safetensors"), num_classes=0,
                                                             custom_load=False))
    assert finetune.head.out_features == 7
    assert all(torch.equal(finetune.state_dict()[k], v) for k, v in weights.items())
    x = torch.randn(2, 3, 32, 32)
    for model in (theirs, fresh):
        for a, b in zip(model.state_dict().values(), ours.state_dict().values(), strict=True):
            assert torch.equal(a, b)
        assert torch.equal(model.eval().forward_features(x), ours.eval().forward_features(x))

    # `ssl-vit export` from the newest checkpoint gives the same weights as the end-of-run export.
    again = load_file(export_run(run, tmp_path / "exported"))
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)

    from accelerate import Accelerator

    scores = knn_report(ours, cfg.eval, Accelerator(), ks=(1, 5)).scores
    assert set(scores) == {1, 5} and all(0 <= r["top1"] <= r["top5"] <= 100 for r in scores.values())


@pytest.mark.parametrize("launcher, setting, expected", [
    ("bf16", None, "bf16"),  # config leaves it unset: `accelerate launch --mixed_precision bf16` applies
    ("bf16", "no", "no"),  # an explicit config value wins (with a warning naming both)
    (None, None, "no"),  # no launcher, nothing set: fp32
])
def test_launcher_precision_applies_unless_the_config_names_one(monkeypatch, launcher, setting, expected):
    import warnings

    from accelerate.state import AcceleratorState

    from ssl_vit.training.distributed import make_accelerator

    if launcher is None:
        monkeypatch.delenv("ACCELERATE_MIXED_PRECISION", raising=False)
    else:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", launcher)  # what `accelerate launch` passes its processes
    cfg = load_config(None, [] if setting is None else [f"train.precision={setting}"])
    # Accelerate keeps one process-wide state, whose precision cannot change: a fresh one here, then back
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert make_accelerator(cfg.train.precision).mixed_precision == expected
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    clash = [str(w.message) for w in caught if "overrides the launcher" in str(w.message)]
    assert len(clash) == (expected != (launcher or "no"))


def test_resume_with_another_model_fails_in_one_line_and_leaves_the_run_alone(tmp_path, demo):
    run = tmp_path / "run"
    base = TINY + [f"data.train={demo.train}", f"train.run_dir={run}", "train.total_steps=2", "train.save_every=2",
                   "train.image_every=0"]
    pretrain(load_config(None, base))
    saved = (run / "config.yaml").read_text()

    with pytest.raises(ValueError) as err:
        pretrain(load_config(None, base + ["model.depth=1"]))
    message = str(err.value)
    assert "\n" not in message and "step_00000002 was made with a different model config" in message
    assert "model.depth: 2 → 1" in message
    # fewer heads or another decoder head count keep every tensor's shape: the checkpoint would load, and break
    # and the backbone's lr scales, which the optimizer's groups restored from the checkpoint would override
    for change, named in [("model.num_heads=1", "model.num_heads 2 → 1"), ("mae.decoder_heads=1",
                                                                          "mae.decoder_heads 2 → 1"),
                          ("optim.backbone_lr_scale=0.5", "optim.backbone_lr_scale 1.0 → 0.5"),
                          ("optim.layer_decay=0.75", "optim.layer_decay 1.0 → 0.75")]:
        with pytest.raises(ValueError, match=rf"^checkpoint .*different model config \({named} since the run's"):
            pretrain(load_config(None, base + [change]))
    assert (run / "config.yaml").read_text() == saved  # the run dir still describes its checkpoint
    export_run(run, tmp_path / "exported")  # ... so export still works

    # A config.yaml that no longer fits its checkpoint (edited by hand): export says so, in one line
    (run / "config.yaml").write_text(saved.replace("depth: 2", "depth: 1"))
    with pytest.raises(ValueError, match=r"^checkpoint .*step_00000002 does not fit .*config.yaml: "
                                         r"backbone\.blocks\.1\..* is in the checkpoint, not in this model$"):
        export_run(run, tmp_path / "exported_again")

    # A checkpoint without model.safetensors (FSDP writes sharded pytorch_model_fsdp_0/): a message, not a traceback
    (run / "checkpoints" / "step_00000002" / "model.safetensors").unlink()
    write_marker(run / "checkpoints" / "step_00000002", 2)  # what such a save vouches for
    with pytest.raises(FileNotFoundError, match=r"step_00000002 holds no model.safetensors \(an FSDP run"):
        export_run(run, tmp_path / "exported_again")


def test_shapeless_changes_compare_heads_as_built():
    from ssl_vit.training.run_dir import shapeless_changes

    saved = load_config(None, ["model.name=vit_tiny_patch16_224"])  # num_heads null: the timm model's 3
    assert shapeless_changes(saved, load_config(None, ["model.name=vit_tiny_patch16_224", "model.num_heads=3"])) == []
    assert shapeless_changes(saved, load_config(None, ["model.name=vit_tiny_patch16_224", "model.num_heads=6"])) == [
        "model.num_heads None → 6"]
    dino = load_config(None, ["objective=dino"])
    assert shapeless_changes(dino, load_config(None, ["objective=dino", "dino.norm_last_layer=false"])) == [
        "dino.norm_last_layer True → False"]
    assert shapeless_changes(dino, load_config(None, ["objective=dino", "mae.decoder_heads=8"])) == []  # not used


@pytest.mark.parametrize("objective,extra", [
    ("mae", ["optim.clip_grad=null"]),
    ("dino", ["dino.out_dim=32", "dino.hidden_dim=32", "dino.bottleneck_dim=16", "dino.local_crops_number=2",
              "dino.local_crops_size=16", "optim.accum_steps=2"]),
])
def test_a_training_step_reads_the_device_once(tmp_path, demo, monkeypatch, objective, extra):
    # Every read of a device value to the host (item, tolist, bool, float, int) stalls a GPU until the queued
    # kernels finish. Outside log, image and checkpoint steps a step has one: the agreed stop/skip flags.
    import ssl_vit.training.loop as train

    reads: list[str] = []
    in_step = {"on": False}
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        real = getattr(torch.Tensor, name)

        def counted(t, *a, _real=real, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            # CPU AdamW reads its step counters (a CPU tensor); fused AdamW on CUDA does not
            if in_step["on"] and f"torch{os.sep}optim" not in caller:
                reads.append(f"{_name} {Path(caller).name}:{sys._getframe(1).f_lineno}")
            return _real(t, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    real_after = train.Trainer._after_step

    def after_step(self, *args, **kwargs):  # logs, images and checkpoints read the device: not counted
        in_step["on"] = False
        real_after(self, *args, **kwargs)
        in_step["on"] = True
    monkeypatch.setattr(train.Trainer, "_after_step", after_step)
    from ssl_vit.methods.base import Objective
    from ssl_vit.methods.dino.model import DINO

    for cls in (Objective, DINO):  # after the last step: DINO's collapse watch reads once more
        real_end = cls.after_training
        monkeypatch.setattr(cls, "after_training", lambda self, _real=real_end: in_step.update(on=False) or _real(self))
    real_run = train.Trainer.run

    def run(self):
        in_step["on"] = True
        try:
            return real_run(self)
        finally:
            in_step["on"] = False
    monkeypatch.setattr(train.Trainer, "run", run)
    steps = 4
    cfg = load_config(None, TINY + extra + [
        f"objective={objective}", f"data.train={demo.train}", f"train.run_dir={tmp_path / 'run'}",
        f"train.total_steps={steps}", "train.log_every=100", "train.image_every=0", "train.save_every=100",
        "train.export=false", "data.num_workers=1"])  # the CPU views' own reads happen in the worker
    pretrain(cfg)
    assert [r.split()[0] for r in reads] == ["tolist"] * steps, reads


def test_an_aborted_run_still_reports_what_the_objective_has_pending(tmp_path, demo, monkeypatch):
    import ssl_vit.training.loop as train
    from ssl_vit.methods.base import Objective
    from ssl_vit.training.monitor import RunAborted

    ended = []
    monkeypatch.setattr(Objective, "after_training", lambda self: ended.append(type(self).__name__))
    monkeypatch.setattr(train.Trainer, "_train", lambda self, log, bar: (_ for _ in ()).throw(RunAborted("nan")))
    cfg = load_config(None, TINY + [f"data.train={demo.train}", f"train.run_dir={tmp_path / 'run'}"])
    with pytest.raises(RunAborted, match="nan"):
        pretrain(cfg)
    assert ended == ["MAE"]
