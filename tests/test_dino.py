"""DINO: loss against a naive re-statement of the paper, center and EMA math, teacher isolation, last-layer
freeze, multi-crop views and their per-view probabilities, and a short run through the real training loop."""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from torch.nn.utils import parametrize
from torchvision.transforms import v2

from ssl_vit.config.methods import DINOConfig
from ssl_vit.config.pretrain import Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from ssl_vit.methods import build_objective
from ssl_vit.methods.dino.head import DINOHead
from ssl_vit.methods.dino.loss import center_stats, dino_loss, teacher_targets, update_center
from ssl_vit.methods.dino.model import DINO, teacher_momentum, teacher_temperature
from ssl_vit.methods.dino.monitor import CollapseWarning, CollapseWatch
from ssl_vit.methods.dino.transforms import MultiCropViews
from ssl_vit.models.backbone import build_backbone

TINY_VIT = ModelConfig(name="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
                       num_heads=2, drop_path_rate=0.1)
TINY_DINO = DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, local_crops_number=3, local_crops_size=16,
                       freeze_last_layer_steps=5, warmup_teacher_temp_steps=10)


def _dino(cfg: DINOConfig = TINY_DINO, total_steps: int = 100) -> DINO:
    torch.manual_seed(0)
    return DINO(cfg, build_backbone(TINY_VIT), total_steps=total_steps)


def _batch(n_local: int = 3, batch: int = 4) -> dict:
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(2)]
    crops += [torch.randn(batch, 3, 16, 16, generator=g) for _ in range(n_local)]
    return {"image": crops}


def _image(seed: int = 0, size: int = 48) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------- loss and center


def _naive_loss(student_out, teacher_out, center, n_crops, student_temp, teacher_temp):
    """The paper's loss, written as plainly as possible: Σ_{t ∈ globals} Σ_{s ≠ t} H(P_t, P_s) / #pairs."""
    batch = teacher_out.shape[0] // 2
    total, terms = 0.0, 0
    for t in range(2):
        q = F.softmax((teacher_out[t * batch:(t + 1) * batch] - center) / teacher_temp, dim=-1)
        for s in range(n_crops):
            if s == t:
                continue
            log_p = F.log_softmax(student_out[s * batch:(s + 1) * batch] / student_temp, dim=-1)
            per_sample = [-(q[b] * log_p[b]).sum() for b in range(batch)]
            total += sum(per_sample) / batch
            terms += 1
    return total / terms


@pytest.mark.parametrize("batch,n_crops,student_temp,teacher_temp", [
    (1, 2, 0.1, 0.04), (3, 4, 0.1, 0.07), (8, 12, 0.2, 0.05), (5, 6, 1.0, 0.5)])
def test_loss_matches_naive_double_loop(batch, n_crops, student_temp, teacher_temp):
    g = torch.Generator().manual_seed(batch * 100 + n_crops)
    k = 33
    student_out = torch.randn(n_crops * batch, k, generator=g, dtype=torch.float64) * 3
    teacher_out = torch.randn(2 * batch, k, generator=g, dtype=torch.float64) * 3
    center = torch.randn(1, k, generator=g, dtype=torch.float64)
    targets = teacher_targets(teacher_out, center.float(), teacher_temp)
    loss = dino_loss(student_out, targets, n_crops, student_temp)
    expected = _naive_loss(student_out, teacher_out, center, n_crops, student_temp, teacher_temp)
    assert loss.item() == pytest.approx(float(expected), rel=1e-5)


def test_loss_rejects_crop_counts_that_do_not_fit():
    with pytest.raises(ValueError, match="does not split into 4 crops"):
        dino_loss(torch.zeros(10, 8), torch.zeros(4, 8), 4, 0.1)


def test_center_update_math():
    g = torch.Generator().manual_seed(0)
    center = torch.randn(1, 16, generator=g)
    teacher_out = torch.randn(10, 16, generator=g)
    expected = 0.9 * center + 0.1 * teacher_out.mean(dim=0, keepdim=True)
    # two micro-batches of one step: their sums add up to the step's mean
    update_center(center, center_stats(teacher_out[:4]) + center_stats(teacher_out[4:]), 0.9)
    torch.testing.assert_close(center, expected)


def _center_worker(rank: int, world: int, init_file: str, queue) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    center = torch.ones(1, 4)
    teacher_out = torch.full((2 + rank, 4), float(rank + 1))  # rank 0: 2 rows of 1, rank 1: 3 rows of 2
    update_center(center, center_stats(teacher_out), 0.5)
    queue.put((rank, center[0].tolist()))  # plain lists: no tensor sharing between processes
    torch.distributed.destroy_process_group()


def test_center_is_averaged_over_ranks(tmp_path):
    ctx = mp.get_context("fork")  # fork: no second torch import
    queue = ctx.Queue()
    procs = [ctx.Process(target=_center_worker, args=(r, 2, str(tmp_path / "pg"), queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    # The global mean counts rows, not ranks: (2·1 + 3·2) / 5 = 1.6; 0.5·1 + 0.5·1.6 = 1.3 on every rank.
    for rank in range(2):
        assert results[rank] == pytest.approx([1.3] * 4)


def test_teacher_temperature_and_momentum_schedules():
    assert teacher_temperature(0, 10, 0.04, 0.07) == pytest.approx(0.04)
    assert teacher_temperature(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert teacher_temperature(10, 10, 0.04, 0.07) == teacher_temperature(10**6, 10, 0.04, 0.07) == 0.07
    assert teacher_temperature(0, 0, 0.04, 0.07) == 0.07
    assert teacher_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert teacher_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert teacher_momentum(100, 100, 0.996) == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ head, teacher


def test_head_uses_weight_norm_parametrization():
    head = DINOHead(24, 50, hidden_dim=40, bottleneck_dim=12, layers=3, norm_last_layer=True)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(24, 40), (40, 40), (40, 12)]
    assert sum(isinstance(m, torch.nn.GELU) for m in head.mlp) == 2
    assert parametrize.is_parametrized(head.last_layer, "weight") and head.last_layer.bias is None
    gain = head.last_layer.parametrizations.weight.original0
    assert gain.shape == (50, 1) and not gain.requires_grad and torch.all(gain == 1)
    # Unit gain: each prototype has norm 1, so the logits of the L2-normalised bottleneck are cosines.
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(50))
    assert head(torch.randn(7, 24)).abs().max() <= 1 + 1e-5
    free = DINOHead(24, 50, hidden_dim=40, bottleneck_dim=12, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad


def test_bn_head_is_the_mlp_with_batch_statistics_in_train_and_eval():
    # DINO's use_bn_in_head: Linear → BatchNorm → GELU for each hidden layer, none after the bottleneck layer
    torch.manual_seed(0)
    head = DINOHead(24, 50, hidden_dim=40, bottleneck_dim=12, layers=3, use_bn=True)
    norms = [m for m in head.mlp if isinstance(m, torch.nn.BatchNorm1d)]
    assert len(norms) == 2 and all(m.running_mean is None for m in norms)
    assert isinstance(head.mlp[-1], torch.nn.Linear) and head.mlp[-1].out_features == 12
    with torch.no_grad():
        for m in norms:  # a non-trivial affine part, so the test sees where it is applied
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(9, 24)
    linears = [m for m in head.mlp if isinstance(m, torch.nn.Linear)]
    h = x
    for linear, norm in zip(linears[:-1], norms, strict=True):
        z = h @ linear.weight.T + linear.bias
        z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + norm.eps) * norm.weight + norm.bias
        h = F.gelu(z)
    want = F.normalize(h @ linears[-1].weight.T + linears[-1].bias, dim=-1) @ head.last_layer.weight.T
    for mode in (True, False):  # the EMA teacher is always in eval mode and normalises its own batch
        torch.testing.assert_close(head.train(mode)(x), want, rtol=1e-5, atol=1e-6)
    plain = DINOHead(24, 50, hidden_dim=40, bottleneck_dim=12, layers=3)
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in plain.mlp)
    dino = _dino(dataclasses.replace(TINY_DINO, use_bn_in_head=True))
    assert any(isinstance(m, torch.nn.BatchNorm1d) for m in dino.teacher["head"].mlp)


def test_a_bn_head_that_could_see_one_row_is_refused_at_load():
    from ssl_vit.config.pretrain import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(None, ["objective=dino", "dino.use_bn_in_head=true", "data.batch_size=1"])
    assert str(err.value) == ("dino.use_bn_in_head: BatchNorm over the head's rows needs data.batch_size >= 2 per "
                              "process, got 1")
    separate = ["objective=dinov2", "dinov2.use_bn_in_head=true", "dinov2.ibot_separate_head=true",
                "data.batch_size=2", "dinov2.mask_sample_probability=0.3"]
    with pytest.raises(ConfigError) as err:
        load_config(None, separate)
    assert str(err.value) == ("dinov2.use_bn_in_head: the separate iBOT head sees the masked patches only, as few "
                              "as 1 a step (int(2 x data.batch_size 2 x mask_sample_probability 0.3)); BatchNorm "
                              "needs 2: raise either")
    load_config(None, [*separate[:-1], "dinov2.mask_sample_probability=0.5"])  # 2 masked crops: loads


def test_cls_token_drawn_like_the_reference():
    # DINO's reference: trunc_normal(std=0.02), where timm's default is normal(std=1e-6)
    backbone = build_backbone(dataclasses.replace(TINY_VIT, embed_dim=192, num_heads=3))
    assert backbone.cls_token.std() < 1e-5
    torch.manual_seed(0)
    DINO(TINY_DINO, backbone)
    assert 0.015 < backbone.cls_token.std() < 0.025


def test_teacher_starts_equal_has_no_grads_and_stays_in_eval():
    dino = _dino()
    for (name, s), (_, t) in zip(dino.backbone.state_dict().items(), dino.teacher["backbone"].state_dict().items(),
                                 strict=True):
        torch.testing.assert_close(s, t, msg=name)
    dino.train()
    assert dino.backbone.training and dino.head.training
    assert not any(m.training for m in dino.teacher.modules())
    assert not any(p.requires_grad for p in dino.teacher.parameters())
    dino(_batch(), step=0)["loss"].backward()
    assert all(p.grad is None for p in dino.teacher.parameters())
    cfg = Config(objective="dino", model=TINY_VIT, dino=TINY_DINO)
    from ssl_vit.training.loop import build_optimizer

    optimizer = build_optimizer(dino, cfg, use_fused=False)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert not in_optimizer & {id(p) for p in dino.teacher.parameters()}
    assert in_optimizer == {id(p) for p in dino.parameters() if p.requires_grad}
    assert dino.export_backbone() is dino.teacher["backbone"]
    student = DINO(dataclasses.replace(TINY_DINO, export_teacher=False), build_backbone(TINY_VIT))
    assert student.export_backbone() is student.backbone


def test_a_skipped_step_leaves_the_center_alone():
    """The trainer skips an update whose loss or gradient norm is NaN/inf on any rank. The center must skip it too:
    one overflowing teacher output would otherwise turn the center, and every later target, into NaN."""
    dino, batch = _dino(), _batch()
    dino.train()
    dino({"image": [crop * float("nan") for crop in batch["image"]]}, step=0)  # a step that gets skipped
    dino.after_skipped_step(0)
    dino(batch, step=0)
    dino.after_step(0)
    with torch.no_grad():
        teacher_out = torch.cat([dino.teacher["head"](dino.teacher["backbone"](crop)) for crop in batch["image"][:2]])
    torch.testing.assert_close(dino.center, 0.1 * teacher_out.mean(dim=0, keepdim=True))  # one update, from zero


def test_ema_update_math():
    dino = _dino(total_steps=100)
    with torch.no_grad():  # make student and teacher differ
        for p in [*dino.backbone.parameters(), *dino.head.parameters()]:
            p.add_(torch.randn_like(p))
    names = [n for n, _ in dino.named_parameters() if not n.startswith("teacher.")]
    before_t = {n: p.clone() for n, p in dino.teacher.named_parameters()}
    student = {n: p.clone() for n, p in dino.named_parameters() if not n.startswith("teacher.")}
    step = 37
    dino.after_step(step)
    m = 1 - (1 - 0.996) * 0.5 * (1 + math.cos(math.pi * step / 100))  # the cosine from 0.996 to 1
    assert len(before_t) == len(names)
    for name in names:
        torch.testing.assert_close(dict(dino.teacher.named_parameters())[name],
                                   m * before_t[name] + (1 - m) * student[name], msg=name)


def test_last_layer_frozen_then_free():
    for norm_last_layer in (True, False):
        dino = _dino(dataclasses.replace(TINY_DINO, norm_last_layer=norm_last_layer))
        last = list(dino.head.last_layer.parameters())
        trainable_last = [p for p in last if p.requires_grad]
        assert len(trainable_last) == (1 if norm_last_layer else 2)
        optimizer = torch.optim.AdamW(dino.param_groups(0.4), lr=0.1)
        for step, frozen in ((0, True), (4, True), (5, False)):
            before = [p.clone() for p in last]
            dino(_batch(), step)["loss"].backward()
            dino.after_backward(step)
            assert all((p.grad is None) == frozen for p in trainable_last)
            assert all(p.grad is not None for p in dino.head.mlp.parameters())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            moved = any(not torch.equal(b, p) for b, p in zip(before, last, strict=True))
            assert moved != frozen  # neither moved nor weight-decayed while frozen


def test_every_trainable_student_parameter_gets_a_gradient():
    dino = _dino()
    dino.train()
    dino(_batch(), step=10)["loss"].backward()
    missing = [n for n, p in dino.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    assert all(p.grad.abs().sum() > 0 for p in dino.parameters() if p.requires_grad)


def test_forward_one_backbone_pass_per_resolution_and_monitors():
    dino = _dino()
    dino.train()
    calls = []
    for vit in (dino.backbone, dino.teacher["backbone"]):
        vit.patch_embed.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    out = dino(_batch(n_local=3, batch=4), step=0)
    # teacher: the 2 globals; student: the 2 globals, then the 3 locals
    assert sorted(calls) == sorted([(8, 3, 32, 32), (8, 3, 32, 32), (12, 3, 16, 16)])
    assert set(out) >= {"loss", "teacher_entropy", "kl", "center_norm", "teacher_temp", "teacher_momentum"}
    assert all(v.numel() == 1 for v in out.values())
    assert 0 <= out["teacher_entropy"] <= math.log(64) + 1e-5
    assert out["kl"] >= -1e-5
    assert out["teacher_temp"].item() == pytest.approx(0.04)
    assert dino.center.abs().sum() == 0  # the center moves after the step, not during its forward
    dino.after_step(0)
    assert dino.center.abs().sum() > 0  # updated in training mode
    assert "center" in dino.state_dict()


@torch.no_grad()
def test_forward_loss_and_entropy_are_the_papers_on_the_heads_outputs():
    # the whole forward (teacher on the globals, centered and sharpened at the warmed-up temperature, student on
    # every crop) against the naive loss on the two heads' outputs, with a center that is not zero
    cfg = dataclasses.replace(TINY_DINO, student_temp=0.2, warmup_teacher_temp=0.02, teacher_temp=0.08)
    dino, step, n_local = _dino(cfg), 4, 3
    dino.train()
    dino.center.copy_(torch.randn(dino.center.shape, generator=torch.Generator().manual_seed(3)))
    outs = {}
    dino.head.register_forward_hook(lambda m, a, out: outs.__setitem__("student", out))
    dino.teacher["head"].register_forward_hook(lambda m, a, out: outs.__setitem__("teacher", out))
    out = dino(_batch(n_local=n_local), step=step)
    temp = 0.02 + (0.08 - 0.02) * step / cfg.warmup_teacher_temp_steps  # linear warmup, written out
    want = _naive_loss(outs["student"].double(), outs["teacher"].double(), dino.center.double(), 2 + n_local,
                       0.2, temp)
    assert out["loss"].item() == pytest.approx(float(want), rel=1e-5)
    q = F.softmax((outs["teacher"].double() - dino.center.double()) / temp, dim=-1)
    assert out["teacher_entropy"].item() == pytest.approx(float(-(q * q.log()).sum(-1).mean()), rel=1e-5)
    assert out["teacher_temp"].item() == pytest.approx(temp)


def test_collapse_warning_once_per_episode():
    # The watch counts on the device and reads it every `window` steps (no host sync per step): the warnings
    # come at steps 9 and 24 here, each naming its episode's first window, as a per-step check would.
    dino = DINO(TINY_DINO, build_backbone(TINY_VIT), collapse_window=5)
    log_k = math.log(64)
    entropies = [0.99] * 4 + [0.5] + [0.99] * 15 + [0.01] * 6  # steps 0-3 short, 5-19 uniform, 20-25 one-hot
    seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, fraction in enumerate(entropies):
            dino._entropy = (torch.tensor(2 * fraction * log_k), 2)  # what 2 micro-batches' forward leaves
            dino.after_skipped_step(step) if step == 4 else dino._watch_collapse(step)
            seen.append(sum(issubclass(w.category, CollapseWarning) for w in caught))
    messages = [str(w.message) for w in caught if issubclass(w.category, CollapseWarning)]
    assert len(messages) == 2 and seen.index(1) == 9 and seen.index(2) == 24
    assert "uniform" in messages[0] and "steps 5-9" in messages[0]
    assert "one-hot" in messages[1] and "steps 20-24" in messages[1]


def test_an_episode_that_reaches_the_window_after_the_last_read_is_warned_when_training_ends():
    dino = DINO(TINY_DINO, build_backbone(TINY_VIT), collapse_window=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(2, 9):  # uniform from step 2: the window is full at step 6, the next read would be at 9
            dino._entropy = (torch.tensor(0.99 * math.log(64)), 1)
            dino.after_step(step)
        assert not caught
        dino.after_training()
        dino.after_training()  # once per episode
    assert [str(w.message).split("for ")[1] for w in caught] == ["steps 2-6; see docs/dino.md"]


def test_collapse_watch_reads_the_device_only_every_window_steps(monkeypatch):
    reads = []
    real = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(1) or real(t))
    watch = CollapseWatch(out_dim=64, window=50)
    for step in range(200):
        watch.update(torch.tensor(0.5), step)
    assert len(reads) == 200 // 50


def test_build_objective_passes_total_steps():
    dino = build_objective("dino", TINY_DINO, build_backbone(TINY_VIT), total_steps=123)
    assert isinstance(dino, DINO) and dino.total_steps == 123
    mae = build_objective("mae", Config().mae, build_backbone(TINY_VIT), total_steps=123)
    assert not isinstance(mae, DINO)


# -------------------------------------------------------------------------------------------------- multi-crop


def test_multicrop_shapes():
    views = MultiCropViews(DINOConfig(local_crops_size=16, local_crops_number=5), global_size=32)
    crops = views(_image())
    assert len(crops) == 7
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 5
    assert all(type(c) is torch.Tensor and c.dtype == torch.uint8 for c in crops)  # normalised on the device
    assert len(MultiCropViews(DINOConfig(local_crops_size=8, local_crops_number=0), global_size=24)(_image())) == 2


def _count_blurs(view: v2.Compose, counter: list[int]) -> None:
    blurs = [inner for t in view.transforms for inner in getattr(t, "transforms", [t])
             if isinstance(inner, v2.GaussianBlur)]  # v2 keeps RandomApply's transforms in a plain list
    assert len(blurs) == 1
    forward = blurs[0].forward

    def counting(*args):
        counter[0] += 1
        return forward(*args)

    blurs[0].forward = counting


@pytest.mark.parametrize("blur_probs,solarize_prob", [((1.0, 0.1, 0.5), 0.2), ((0.3, 0.8, 0.0), 0.6)])
def test_per_view_blur_and_solarize_probabilities(blur_probs, solarize_prob):
    """Measured over many draws: blur by counting the blur's calls, solarize from the pixels it inverts."""
    cfg = DINOConfig(local_crops_size=8, local_crops_number=1, color_jitter_prob=0.0, grayscale_prob=0.0,
                     blur_probs=blur_probs, solarize_prob=solarize_prob)
    views = MultiCropViews(cfg, global_size=16)
    counts = {name: [0] for name in ("global1", "global2", "local")}
    for name, counter in counts.items():
        _count_blurs(getattr(views, name), counter)
    flat = Image.new("RGB", (24, 24), (200, 200, 200))  # crop, flip and blur keep it flat; solarize → 55
    n = 1500
    solarized = torch.zeros(3)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a loader worker: tiny blurs on a busy machine are far slower multi-threaded
    try:
        for _ in range(n):
            for i, crop in enumerate(views(flat)):
                solarized[i] += float(crop.float().mean() < 128)
    finally:
        torch.set_num_threads(threads)
    tol = 4 * math.sqrt(0.25 / n)  # 4 standard deviations of a proportion
    for name, p in zip(counts, blur_probs, strict=True):
        assert counts[name][0] / n == pytest.approx(p, abs=tol), name
    assert solarized[0] == 0 and solarized[2] == 0  # only the second global view is ever solarized
    assert solarized[1] / n == pytest.approx(solarize_prob, abs=tol)


def test_dino_views_follow_config():
    cfg = dataclasses.replace(TINY_DINO, local_crops_number=4, local_crops_size=8)
    crops = _dino(cfg).views(_image())
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 8, 8)] * 4


# ------------------------------------------------------------------------------------------ the training loop


def test_pretrain_end_to_end_with_resume(tmp_path):
    from ssl_vit.data.demo import ensure_demo_data
    from ssl_vit.training.checkpoint import latest_checkpoint, load_backbone
    from ssl_vit.training.loop import pretrain

    demo = ensure_demo_data(tmp_path / "demo", n_train=64, n_knn_train=20, n_knn_val=10)
    cfg = Config(
        objective="dino", model=TINY_VIT, dino=dataclasses.replace(TINY_DINO, local_crops_number=2),
        data=DataConfig(train=demo.train, batch_size=8, num_workers=0, shuffle_buffer=16),
        optim=OptimConfig(lr=1e-3, clip_grad=3.0, weight_decay=0.04, weight_decay_end=0.4),
        train=TrainConfig(run_dir=str(tmp_path / "run"), total_steps=3, warmup_steps=1, log_every=1,
                          image_every=2, save_every=2, keep_last=5),
    )
    result = pretrain(cfg)
    assert result.step == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("train/teacher_entropy", "train/kl", "train/center_norm", "train/teacher_temp"):
        assert all(math.isfinite(r[key]) for r in rows), key
    step, path = latest_checkpoint(tmp_path / "run")
    state = load_file(str(path / "model.safetensors"))
    assert step == 3 and "center" in state and any(k.startswith("teacher.head.") for k in state)
    assert state["center"].abs().sum() > 0
    vit, meta = load_backbone(result.backbone)  # strict load in plain timm
    torch.testing.assert_close(vit.state_dict()["cls_token"], state["teacher.backbone.cls_token"])

    resumed = pretrain(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, total_steps=4)))
    assert resumed.step == 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 4
