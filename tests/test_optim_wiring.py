"""The training loop's optimizer: the lr and weight decay it steps with, per parameter group, against the
schedules written out; gradient accumulation against one batch of the same samples."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from tiny_runs import TINY_MAE

from ssl_vit.config.pretrain import load_config
from ssl_vit.data.demo import ensure_demo_data
from ssl_vit.training.loop import pretrain

TINY = TINY_MAE + [
    "data.shuffle_buffer=16", "train.total_steps=6", "train.warmup_steps=2", "train.log_every=1",
    "train.image_every=0", "train.save_every=0", "train.export=false"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return ensure_demo_data(tmp_path_factory.mktemp("demo"), n_train=64, n_knn_train=10, n_knn_val=10).train


def test_each_group_steps_with_the_scheduled_lr_and_weight_decay(tmp_path, shards, monkeypatch):
    seen = []
    real_step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen.append([(g["lr"], g["weight_decay"], g["apply_wd"]) for g in self.param_groups])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    pretrain(load_config(None, TINY + [f"data.train={shards}", f"train.run_dir={tmp_path}", "data.num_workers=0",
                                       "data.batch_size=8", "optim.accum_steps=2", "optim.base_lr=0.0256",
                                       "optim.min_lr=1e-5", "optim.weight_decay=0.05",
                                       "optim.weight_decay_end=0.2"]))
    peak = 0.0256 * 8 * 2 / 256  # the linear scaling rule: base_lr × global batch (8 × accum 2) / 256
    assert len(seen) == 6
    for step, groups in enumerate(seen):
        if step < 2:
            lr = peak * step / 2
        else:
            lr = 1e-5 + (peak - 1e-5) * 0.5 * (1 + math.cos(math.pi * (step - 2) / 4))
        wd = 0.2 + (0.05 - 0.2) * 0.5 * (1 + math.cos(math.pi * step / 6))
        assert sorted(apply for _, _, apply in groups) == [False, True]
        for group_lr, group_wd, apply_wd in groups:
            assert group_lr == pytest.approx(lr) and group_wd == pytest.approx(wd if apply_wd else 0.0)


def _logged(run_dir, key):
    return [json.loads(line)[key] for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_accumulating_two_half_batches_equals_one_whole_batch(tmp_path, shards):
    # one loader worker: the samples and their augmentations do not depend on the batch size, and the masks
    # of two half batches are the same draws as those of the whole one (nothing else draws in between). The
    # gradient norm shows a missing 1/accum_steps, which AdamW's update alone would hide.
    runs = {}
    for name, batch, accum in (("whole", 8, 1), ("halves", 4, 2)):
        runs[name] = tmp_path / name
        pretrain(load_config(None, TINY + [f"data.train={shards}", f"train.run_dir={runs[name]}",
                                           "data.num_workers=1", f"data.batch_size={batch}",
                                           f"optim.accum_steps={accum}", "optim.base_lr=0.0256",
                                           "optim.clip_grad=1000", "train.save_every=6"]))
    whole, halves = runs["whole"], runs["halves"]
    assert _logged(whole, "train/lr") == _logged(halves, "train/lr")  # the same global batch: the same peak
    assert _logged(halves, "train/loss") == pytest.approx(_logged(whole, "train/loss"), rel=1e-5)
    assert _logged(halves, "train/grad_norm") == pytest.approx(_logged(whole, "train/grad_norm"), rel=1e-4)
    a, b = (load_file(run / "checkpoints" / "step_00000006" / "model.safetensors") for run in (whole, halves))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_peak_lr_scales_with_the_global_batch_unless_an_lr_is_given():
    from ssl_vit.training.loop import peak_lr

    cfg = load_config(None, ["optim.base_lr=1.5e-4", "data.batch_size=64", "optim.accum_steps=2"])
    assert peak_lr(cfg, num_processes=8) == pytest.approx(1.5e-4 * 64 * 8 * 2 / 256)  # MAE: blr × 1024 / 256
    assert peak_lr(load_config(None, ["optim.lr=3e-3", "data.batch_size=64"]), num_processes=8) == 3e-3
