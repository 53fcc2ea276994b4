"""Exact resume: N steps straight == N/2 steps, crash, resume to N (fp32, CPU), bit for bit."""

import json

import pytest
import torch
from safetensors.torch import load_file

from ssl_vit.config.pretrain import load_config
from ssl_vit.data.demo import ensure_demo_data
from ssl_vit.methods import OBJECTIVES
from ssl_vit.training.checkpoint import complete_checkpoints
from ssl_vit.training.loop import pretrain

TINY_MODEL = ["model.name=vit_tiny_patch16_224", "model.img_size=32", "model.patch_size=8", "model.embed_dim=48",
              "model.depth=2", "model.num_heads=2"]
TINY = {
    "mae": ["objective=mae", "mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2"],
    "dino": ["objective=dino", "dino.out_dim=64", "dino.hidden_dim=32", "dino.bottleneck_dim=16",
             "dino.local_crops_number=2", "dino.local_crops_size=16", "dino.warmup_teacher_temp_steps=3",
             "dino.freeze_last_layer_steps=2", "optim.weight_decay_end=0.4", "model.drop_path_rate=0.1"],
    # iBOT masks and the separate head's EMA draw and move state of their own; softmax centering moves two centers
    "dinov2": ["objective=dinov2", "dinov2.out_dim=64", "dinov2.hidden_dim=32", "dinov2.bottleneck_dim=16",
               "dinov2.local_crops_number=2", "dinov2.local_crops_size=16", "dinov2.warmup_teacher_temp_steps=3",
               "dinov2.freeze_last_layer_steps=2", "dinov2.ibot_separate_head=true", "dinov2.ibot_out_dim=48",
               "dinov2.ibot_hidden_dim=32", "dinov2.ibot_bottleneck_dim=16", "dinov2.centering=softmax",
               "model.reg_tokens=2", "optim.weight_decay_end=0.4", "model.drop_path_rate=0.1"],
}
TRAIN = ["data.batch_size=4", "data.shuffle_buffer=8", "optim.lr=1e-3", "optim.clip_grad=3.0",
         "train.total_steps=6", "train.warmup_steps=2", "train.log_every=1", "train.image_every=0",
         "train.save_every=3", "train.keep_last=3", "train.export=false"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return ensure_demo_data(tmp_path_factory.mktemp("demo"), n_train=48, n_knn_train=10, n_knn_val=10).train


def losses(run_dir):
    return [(r["step"], r["train/loss"]) for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())]


@pytest.mark.parametrize("objective", ["mae", "dino", "dinov2"])
@pytest.mark.parametrize("workers", [0, 1])
def test_resume_is_bit_identical(tmp_path, shards, crash_in_step, objective, workers):
    if objective not in OBJECTIVES:
        pytest.skip(f"{objective} is not built in")
    base = TINY_MODEL + TINY[objective] + TRAIN + [f"data.train={shards}", f"data.num_workers={workers}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain(load_config(None, base + [f"train.run_dir={straight}"]))

    cfg = load_config(None, base + [f"train.run_dir={resumed}"])
    with crash_in_step(OBJECTIVES[objective], 4):
        pretrain(cfg)
    assert [s for s, _ in complete_checkpoints(resumed)] == [3]
    pretrain(cfg)

    a = load_file(straight / "checkpoints" / "step_00000006" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "step_00000006" / "model.safetensors")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"parameters differ after resume: {different[:5]}"
    assert losses(straight) == losses(resumed)
    assert [s for s, _ in losses(resumed)] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("objective", ["mae", "dino"])
def test_resume_after_a_stop_off_the_checkpoint_grid_is_bit_identical(tmp_path, shards, monkeypatch, objective):
    # a stop signal at the end of step 4 is seen in step 5, which then saves, off the save_every=3 grid: the
    # resume re-reads the stream from step 3 and skips 2 batches (data.num_workers > 0: the loader's random
    # numbers are its own)
    import signal

    base = TINY_MODEL + TINY[objective] + TRAIN + [f"data.train={shards}", "data.num_workers=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    pretrain(load_config(None, base + [f"train.run_dir={straight}"]))

    cls = OBJECTIVES[objective]
    original = cls.after_step

    def stop_in_step_4(self, step):
        original(self, step)
        if step == 3:  # 0-based: the fourth step
            signal.raise_signal(signal.SIGTERM)

    monkeypatch.setattr(cls, "after_step", stop_in_step_4)
    cfg = load_config(None, base + [f"train.run_dir={resumed}"])
    assert pretrain(cfg).stopped_by == "SIGTERM"
    assert [s for s, _ in complete_checkpoints(resumed)] == [3, 5]
    monkeypatch.setattr(cls, "after_step", original)
    pretrain(cfg)

    a = load_file(straight / "checkpoints" / "step_00000006" / "model.safetensors")
    b = load_file(resumed / "checkpoints" / "step_00000006" / "model.safetensors")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert losses(straight) == losses(resumed)
