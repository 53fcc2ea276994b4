"""Device-side augmentation: parameter ranges and per-view probabilities, what each op does, and short runs."""

import dataclasses
import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

from ssl_vit.config.methods import DINOConfig
from ssl_vit.config.pretrain import load_config
from ssl_vit.data.demo import ensure_demo_data
from ssl_vit.data.device.augment import (
    CheapView,
    DeviceAugment,
    ViewParams,
    ViewSpec,
    augment_view,
    sample_crop_boxes,
    sample_group_params,
)
from ssl_vit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ssl_vit.methods.dino.transforms import device_views
from ssl_vit.training.loop import pretrain

N = 20_000  # draws per probability: binomial std ≤ 0.0036, so a tolerance of 0.02 is > 5σ yet catches bugs


@pytest.mark.parametrize("scale", [(0.05, 0.4), (0.4, 1.0), (0.2, 1.0)])
def test_crop_boxes_respect_scale_and_ratio(scale):
    boxes = sample_crop_boxes(N, scale, generator=torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert boxes.min() >= 0 and boxes.max() <= 1 + 1e-6
    whole = (w > 1 - 1e-6) & (h > 1 - 1e-6)  # torchvision's fallback when no trial fits
    area, ratio = (w * h)[~whole], (w / h)[~whole]
    assert area.min() >= scale[0] - 1e-6 and area.max() <= scale[1] + 1e-6
    assert ratio.min() >= 3 / 4 - 1e-5 and ratio.max() <= 4 / 3 + 1e-5
    assert whole.float().mean() < 0.01  # the fallback is rare
    # log-uniform aspect ratio: as many wide crops as tall ones; areas spread over the whole range
    assert abs((ratio > 1).float().mean() - 0.5) < 0.02
    assert area.min() < scale[0] + 0.05 * (scale[1] - scale[0]) and area.max() > scale[1] - 0.1


def _rows(p: ViewParams, view: int, n: int) -> ViewParams:
    """View `view`'s n rows of a group's parameters."""
    return ViewParams(**{f.name: None if (v := getattr(p, f.name)) is None else v[view * n:(view + 1) * n]
                         for f in dataclasses.fields(p)})


def test_per_view_probabilities_match_dino():
    cfg = DINOConfig(local_crops_number=2)
    specs = device_views(cfg, 32)
    g = torch.Generator().manual_seed(1)
    expected_blur = [cfg.blur_probs[0], cfg.blur_probs[1], cfg.blur_probs[2], cfg.blur_probs[2]]
    expected_solarize = [0.0, cfg.solarize_prob, 0.0, 0.0]
    alone = [sample_group_params([spec], N, generator=g) for spec in specs]
    # grouped as DeviceAugment groups them: each view keeps its own probabilities in its rows of the group
    globals_, locals_ = sample_group_params(specs[:2], N, generator=g), sample_group_params(specs[2:], N, generator=g)
    grouped = [_rows(globals_, 0, N), _rows(globals_, 1, N), _rows(locals_, 0, N), _rows(locals_, 1, N)]
    for i, p in enumerate(alone + grouped):
        spec, blur, solarize = specs[i % 4], expected_blur[i % 4], expected_solarize[i % 4]
        rates = {"flip": p.flip, "jitter": p.jittered, "gray": p.gray, "blur": p.blur_sigma, "solarize": p.solarize}
        expected = {"flip": 0.5, "jitter": cfg.color_jitter_prob, "gray": cfg.grayscale_prob, "blur": blur,
                    "solarize": solarize}
        for name, drawn in rates.items():
            if i < 4:  # a view alone: an effect it never applies is not drawn at all
                assert (drawn is None) == (expected[name] == 0), (spec, name)
            rate = 0.0 if drawn is None else (drawn > 0).float().mean().item()
            assert abs(rate - expected[name]) < 0.02, (spec, name)
        sigma = p.blur_sigma[p.blur_sigma > 0]
        assert sigma.numel() == 0 or (sigma.min() >= 0.1 and sigma.max() <= 2.0)
        j = p.jitter[p.jittered]
        assert (j[:, :2] >= 0.6).all() and (j[:, :2] <= 1.4).all()
        assert (j[:, 2] >= 0.8).all() and (j[:, 2] <= 1.2).all() and (j[:, 3].abs() <= 0.1).all()
        assert (p.jitter[~p.jittered] == torch.tensor([1.0, 1.0, 1.0, 0.0])).all()
    with pytest.raises(ValueError, match="crop scale"):
        sample_group_params(specs[1:3], 4)


def _unnormalize(x):
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x * std + mean


def _params(b, **overrides):
    p = sample_group_params([ViewSpec(16, (1.0, 1.0), flip_prob=0.0)], b, generator=torch.Generator().manual_seed(2))
    p.boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * b)
    for k, v in overrides.items():
        setattr(p, k, v)
    return p


def test_each_op_does_what_it_says():
    src = torch.rand(2, 3, 16, 16)
    same = _unnormalize(augment_view(src, _params(2), 16))
    torch.testing.assert_close(same, src, atol=1e-4, rtol=0)  # identity box, no op: the input back
    flipped = _unnormalize(augment_view(src, _params(2, flip=torch.tensor([True, False])), 16))
    torch.testing.assert_close(flipped[0], src[0].flip(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(flipped[1], src[1], atol=1e-4, rtol=0)
    gray = _unnormalize(augment_view(src, _params(2, gray=torch.tensor([True, False])), 16))
    assert torch.allclose(gray[0, 0], gray[0, 1], atol=1e-5) and not torch.allclose(gray[1, 0], gray[1, 1])
    const = torch.full((1, 3, 16, 16), 200 / 255)
    sol = _unnormalize(augment_view(const, _params(1, solarize=torch.tensor([True])), 16))
    torch.testing.assert_close(sol, torch.full_like(sol, 55 / 255), atol=1e-4, rtol=0)
    blurred = _unnormalize(augment_view(src, _params(2, blur_sigma=torch.tensor([2.0, 0.0])), 16))
    assert blurred[0].std() < 0.6 * src[0].std()
    torch.testing.assert_close(blurred[1], src[1], atol=1e-4, rtol=0)
    dark = _params(1, jittered=torch.tensor([True]), jitter=torch.tensor([[0.6, 1.0, 1.0, 0.0]]))
    torch.testing.assert_close(_unnormalize(augment_view(src[:1], dark, 16)), src[:1] * 0.6, atol=1e-4, rtol=0)
    # hue: mid-range colours, which a tenth of a turn never pushes out of [0, 1], against the rotation of the
    # YIQ chroma plane written out pixel by pixel; the luma (Y) stays as it was
    mid = 0.35 + 0.3 * src[:1]
    hue = _params(1, jittered=torch.tensor([True]), jitter=torch.tensor([[1.0, 1.0, 1.0, 0.1]]))
    shifted = _unnormalize(augment_view(mid, hue, 16))
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    cos, sin = math.cos(2 * math.pi * 0.1), math.sin(2 * math.pi * 0.1)
    want = torch.empty_like(mid)
    for row in range(16):
        for col in range(16):
            y, i, q = (to_yiq @ mid[0, :, row, col]).tolist()
            want[0, :, row, col] = torch.linalg.solve(to_yiq, torch.tensor([y, cos * i - sin * q, sin * i + cos * q]))
    torch.testing.assert_close(shifted, want, atol=1e-4, rtol=0)
    luma = to_yiq[0].view(1, 3, 1, 1)
    torch.testing.assert_close((shifted * luma).sum(1), (mid * luma).sum(1), atol=1e-4, rtol=0)
    assert (shifted - mid).abs().max() > 0.01  # and the colours did move


def test_shapes_dtypes_and_input_check():
    cfg = DINOConfig(local_crops_number=3, local_crops_size=16)
    aug = DeviceAugment(device_views(cfg, 32))
    out = aug(torch.randint(0, 256, (4, 3, 37, 37), dtype=torch.uint8))
    assert [tuple(o.shape) for o in out] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 3
    assert all(o.dtype == torch.float32 and torch.isfinite(o).all() for o in out)
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.rand(4, 3, 37, 37))
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8))
    cheap = CheapView(37)(img)
    assert type(cheap) is torch.Tensor and cheap.dtype == torch.uint8 and cheap.shape == (3, 37, 37)
    assert math.isclose(cheap.float().mean().item(), np.asarray(img).mean(), rel_tol=0.1)


def test_a_group_is_its_views_augmented_alone():
    # rows k·B of one call on a batch of B = each view's B rows alone, with the same parameters
    src, b = torch.rand(3, 3, 20, 20), 3
    specs = device_views(DINOConfig(), 16)[:2]  # the two globals: every effect drawn for the group
    p = sample_group_params(specs, b, generator=torch.Generator().manual_seed(3))
    assert p.boxes.shape == (2 * b, 4)
    together = augment_view(src, p, 16)
    for view in range(2):
        alone = augment_view(src, _rows(p, view, b), 16)
        torch.testing.assert_close(together[view * b:(view + 1) * b], alone, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="multiple of 4"):
        augment_view(torch.rand(4, 3, 20, 20), p, 16)
    # a skipped effect (None) gives the images the effect computed on every row and kept on none gives
    crop = sample_group_params([ViewSpec(16, (0.2, 1.0))], b, generator=torch.Generator().manual_seed(4))
    assert crop.jitter is crop.jittered is crop.gray is crop.blur_sigma is crop.solarize is None
    off = torch.zeros(b, dtype=torch.bool)
    computed = dataclasses.replace(crop, jitter=torch.tensor([[0.6, 1.4, 1.2, 0.1]] * b), jittered=off, gray=off,
                                   blur_sigma=torch.zeros(b), solarize=off)
    torch.testing.assert_close(augment_view(src, crop, 16), augment_view(src, computed, 16), atol=1e-6, rtol=0)


def test_groups_keep_spec_order_and_each_views_probabilities():
    # views 0 and 2 form one group (same size and scale) with their own flip probabilities; view 1 sits between.
    # Scale (1, 1) crops the whole square (no aspect ratio fits that area), so each view is known exactly.
    specs = [ViewSpec(16, (1.0, 1.0), flip_prob=1.0), ViewSpec(8, (1.0, 1.0)), ViewSpec(16, (1.0, 1.0), flip_prob=0.0)]
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    flipped, small, plain = DeviceAugment(specs)(images)
    src = images.float() / 255
    torch.testing.assert_close(_unnormalize(flipped), src.flip(-1), atol=1e-4, rtol=0)
    torch.testing.assert_close(_unnormalize(plain), src, atol=1e-4, rtol=0)
    assert small.shape == (3, 3, 8, 8)


class _CountOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket] += 1
        return func(*args, **(kwargs or {}))


def _ops(specs: list[ViewSpec]) -> Counter:
    images, augment = torch.randint(0, 256, (2, 3, 37, 37), dtype=torch.uint8), DeviceAugment(specs)
    augment(images)  # the first call also makes the cached device constants
    with _CountOps() as counter:
        augment(images, generator=torch.Generator().manual_seed(0))
    return counter.ops


def test_views_share_their_ops_and_skip_unused_effects():
    # On a GPU each op is a kernel launch (~5–10 µs of host time): for a small model the step is launch-bound.
    # Augmenting each view alone, DINO's default 12 views took 2,258 aten ops (≈190 a view, 24 convolutions) and
    # MAE's crop-and-flip view 190, colour jitter and blur included, though then thrown away (torch 2.15).
    dino = _ops(device_views(DINOConfig(local_crops_size=16), 32))
    assert sum(dino.values()) < 2258 // 2
    assert dino[torch.ops.aten.convolution] == 4  # two blur passes for the globals, two for the locals
    assert _ops(device_views(DINOConfig(local_crops_size=16, local_crops_number=2), 32)) == dino  # locals: one group
    mae = _ops([ViewSpec(32, (0.2, 1.0))])
    assert sum(mae.values()) < 190 // 2
    # blur's padding and convolutions, jitter's clamps, the hue rotation's batched matmul
    for unused in ("reflection_pad2d", "convolution", "clamp", "bmm"):
        assert getattr(torch.ops.aten, unused) not in mae, unused


TINY_MAE = [
    "model.name=vit_tiny_patch16_224", "model.img_size=32", "model.patch_size=8", "model.embed_dim=32",
    "model.depth=1", "model.num_heads=2", "mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2",
    "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8", "optim.lr=1e-3", "train.total_steps=2",
    "train.warmup_steps=1", "train.log_every=1", "train.image_every=2", "train.save_every=0", "train.export=false",
]
TINY_DINO = [*TINY_MAE, "objective=dino", "dino.out_dim=32", "dino.hidden_dim=32", "dino.bottleneck_dim=16",
             "dino.local_crops_number=2", "dino.local_crops_size=16"]


@pytest.mark.parametrize("overrides", [TINY_MAE, TINY_DINO], ids=["mae", "dino"])
def test_pretrain_with_device_aug(tmp_path, overrides, monkeypatch):
    demo = ensure_demo_data(tmp_path / "demo", n_train=16, n_knn_train=4, n_knn_val=4)
    cfg = load_config(None, [*overrides, "data.device_aug=true", f"data.train={demo.train}",
                             f"train.run_dir={tmp_path / 'run'}"])
    seen = []
    real_call = DeviceAugment.__call__

    def spy(self, images):
        seen.append((tuple(images.shape), images.dtype))
        return real_call(self, images)

    monkeypatch.setattr(DeviceAugment, "__call__", spy)
    result = pretrain(cfg)
    assert result.step == 2 and (tmp_path / "run" / "log.jsonl").is_file()
    # the loader sent the cheap uint8 squares (round(32 / 0.875) = 37 px); the views were made here: once a
    # step, and once more for the image logged at step 2
    assert seen == [((4, 3, 37, 37), torch.uint8)] * 3
