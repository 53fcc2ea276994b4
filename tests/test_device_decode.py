"""Device-side JPEG decode (data.device_decode), run on CPU tensors: the same squares as the CPU path, exact skip
counts for what fails, and a short pretraining run through the trainer."""

import io
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vit.config.pretrain import ConfigError, DataConfig, load_config
from ssl_vit.data import shards
from ssl_vit.data.device import decode as device_decode
from ssl_vit.data.device.augment import CheapView
from ssl_vit.data.device.decode import (
    DeviceDecoder,
    decode_on_host,
    decoded_batches,
    jpeg_payload,
    pack_payloads,
    unpack_payloads,
)
from ssl_vit.data.samples import SKIP_REASONS, SampleError
from ssl_vit.data.shards import DecodeStage, SkipCounter, collate, train_stream
from ssl_vit.data.writer import write_samples
from ssl_vit.training.loop import pretrain

SIZE = 36
BIG = 10**8
CORRUPT = SKIP_REASONS.index("corrupt_image")


def encode(h: int, w: int, fmt: str = "JPEG", mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    # smooth colour field plus noise: photo-like enough for a lossy codec
    img = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    noisy = np.asarray(img, dtype=np.float32) + rng.normal(0, 8, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def cpu_square(data: bytes) -> torch.Tensor:
    return CheapView(SIZE)(Image.open(io.BytesIO(data)).convert("RGB"))


def test_payload_only_for_what_the_device_can_decode():
    rgb = encode(50, 70)
    assert jpeg_payload({"jpg": rgb}, BIG) == rgb
    assert jpeg_payload({"jpeg": encode(30, 40, mode="L")}, BIG) is not None  # greyscale: decoded as RGB
    assert jpeg_payload({"jpg": encode(30, 40, mode="CMYK")}, BIG) is None  # CMYK stays on the CPU path
    assert jpeg_payload({"png": encode(30, 40, "PNG")}, BIG) is None
    assert jpeg_payload({"jpg": encode(30, 40, "PNG")}, BIG) is None  # a PNG misnamed .jpg
    assert jpeg_payload({"jpg": b"not an image"}, BIG) is None  # the CPU path names and counts it
    assert jpeg_payload({"jpg": rgb}, 50 * 70 - 1) is None  # too large: the CPU path counts it
    assert jpeg_payload({"cls": b"3"}, BIG) is None


def _batch(items: list[tuple[bytes, str]], extra: list[dict] | None = None) -> dict:
    """A loader batch as `collate` makes it: JPEGs the device takes go through, the rest decoded here."""
    samples = []
    for data, ext in items:
        payload = jpeg_payload({ext: data}, BIG)
        image = None if payload is not None else cpu_square(data)
        samples.append({"image": image, "jpeg": payload, "skipped": [0] * len(SKIP_REASONS)})
    for sample, more in zip(samples, extra or [{}] * len(samples), strict=True):
        sample.update(more)
    return collate(samples)


def test_pack_and_unpack_payloads():
    data, sizes = pack_payloads([b"abc", None, b"de"])
    assert data.dtype == torch.uint8 and bytes(data.numpy()) == b"abcde" and sizes.tolist() == [3, 0, 2]
    assert [None if t is None else bytes(t.numpy()) for t in unpack_payloads(data, sizes)] == [b"abc", None, b"de"]
    empty, none_sizes = pack_payloads([None, None])
    assert empty.numel() == 0 and unpack_payloads(empty, none_sizes) == [None, None]


def test_decoder_matches_cpu_path_and_counts_failures(caplog):
    images = [encode(50, 70, seed=1), encode(80, 40, seed=2), encode(36, 36, mode="L", seed=3)]
    truncated = images[0][: len(images[0]) // 2]
    assert jpeg_payload({"jpg": truncated}, BIG) is not None  # the header is fine: only the device can tell
    png = encode(45, 60, "PNG", seed=4)
    skips = [{"skipped": [0] * len(SKIP_REASONS)} for _ in range(5)]
    skips[1]["skipped"][0], skips[3]["skipped"][3] = 2, 1  # skips the loader attached to samples 1 and 3
    extra = [{**skip, "label": i, "key": k} for i, (skip, k) in enumerate(zip(skips, "abcde", strict=True))]
    batch = _batch([(images[0], "jpg"), (truncated, "jpg"), (images[1], "jpg"), (png, "png"), (images[2], "jpg")],
                   extra)
    assert batch["jpeg_sizes"].tolist()[3] == 0 and batch["image"].shape == (1, 3, SIZE, SIZE)  # the PNG only
    out = DeviceDecoder(SIZE, torch.device("cpu"))(batch)
    # the broken row takes a copy of the first good one: the batch keeps its size
    expected = torch.stack([cpu_square(images[0]), cpu_square(images[0]), cpu_square(images[1]), cpu_square(png),
                            cpu_square(images[2])])
    assert out["image"].dtype == torch.uint8 and out["image"].shape == (5, 3, SIZE, SIZE)
    assert torch.equal(out["image"], expected)  # same libjpeg-turbo decode, same antialiased resize
    assert out["label"].tolist() == [0, 0, 2, 3, 4] and out["key"] == ["a", "a", "c", "d", "e"]
    assert out["refilled"] == 1  # the copy is no image of its own (train_monitor counts 4 images)
    assert "jpeg" not in out and "jpeg_sizes" not in out
    totals = out["skipped"].sum(dim=0)
    assert totals[CORRUPT] == 1 and totals[0] == 2 and totals[3] == 1 and int(totals.sum()) == 4
    assert "counted as corrupt_image" in caplog.text


def test_a_batch_with_nothing_decodable_passes_its_counts_on():
    data = encode(50, 70)
    decoder = DeviceDecoder(SIZE, torch.device("cpu"))
    broken = _batch([(data[: len(data) // 2], "jpg")] * 2, [{"skipped": [0, 1, 0, 0, 0]}, {"skipped": [0] * 5}])
    assert decoder(broken) is None
    out = decoder(_batch([(data, "jpg")]))
    assert out["image"].shape == (1, 3, SIZE, SIZE)
    assert out["skipped"].sum(dim=0).tolist() == [0, 1, 2, 0, 0]  # 1 carried no_image + 2 corrupt, exact
    again = decoder(_batch([(data, "jpg")]))
    assert int(again["skipped"].sum()) == 0  # carried once, not twice
    stream = [_batch([(data[: len(data) // 2], "jpg")]), _batch([(data, "jpg")])]
    out = list(decoded_batches(stream, SIZE, torch.device("cpu")))  # the trainer's stream: the empty one left out
    assert len(out) == 1 and out[0]["skipped"].sum(dim=0)[CORRUPT] == 1


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("jpeg_shards")
    samples = []
    for i in range(24):
        fmt, mode = ("PNG", "RGB") if i % 6 == 5 else ("JPEG", "L" if i % 6 == 4 else "RGB")
        ext = "png" if fmt == "PNG" else "jpg"
        samples.append({"__key__": f"s{i:03d}", ext: encode(40 + i, 60 - i, fmt, mode, seed=i)})
    write_samples(samples, out, "train", max_count=8)
    return str(out / "train-{000000..000002}.tar")


def test_stream_with_device_decode_equals_cpu_decode(jpeg_shards):
    def first_batches(device_decode: bool) -> list[torch.Tensor]:
        cfg = DataConfig(train=jpeg_shards, batch_size=6, num_workers=0, shuffle_buffer=10,
                         device_decode=device_decode)
        stream = iter(train_stream(cfg, CheapView(SIZE), rank=0, world_size=1, seed=3))
        decoder = DeviceDecoder(SIZE, torch.device("cpu"))
        return [(decoder(next(stream)) if device_decode else next(stream))["image"] for _ in range(4)]

    for on, off in zip(first_batches(True), first_batches(False), strict=True):
        assert torch.equal(on, off)


def test_config_rules():
    assert not DataConfig().device_aug  # opt-in until a GPU measurement shows it wins
    with pytest.raises(ConfigError, match="data.device_decode: needs data.device_aug"):
        load_config(None, ["data.device_decode=true"])
    with pytest.raises(ConfigError, match="data.device_decode: needs data.device_aug"):
        load_config(None, ["data.device_decode=true", "data.device_aug=false"])


def test_pretrain_with_device_decode(tmp_path, jpeg_shards):
    cfg = load_config(None, [
        "model.img_size=32", "model.patch_size=8", "model.embed_dim=32", "model.depth=1", "model.num_heads=2",
        "mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2", "data.batch_size=4",
        "data.num_workers=1", "data.shuffle_buffer=8", "optim.lr=1e-3", "train.total_steps=3", "train.warmup_steps=1",
        "train.log_every=1", "train.save_every=0", "train.export=false", "data.device_aug=true",
        "data.device_decode=true",
        f"data.train={jpeg_shards}", f"train.run_dir={tmp_path / 'run'}"])
    result = pretrain(cfg)
    assert result.step == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]


def test_host_tensor_decode_gives_pil_pixels_and_the_same_skips(monkeypatch):
    """Device augmentation's CPU square takes tensors, so the loader decodes its JPEGs with torchvision into one
    (`decode_on_host`). It must change nothing but the cost: the same pixels and the same skip reasons."""
    rgb, grey = encode(50, 70, seed=1), encode(30, 40, mode="L", seed=2)
    truncated = rgb[: len(rgb) // 2]
    cases = [({"jpg": rgb}, b"1"), ({"jpeg": grey}, b"2"), ({"jpg": encode(30, 40, mode="CMYK", seed=3)}, b"3"),
             ({"png": encode(45, 60, "PNG", seed=4)}, b"4"), ({"jpg": truncated}, b"5"), ({"jpg": b"junk"}, b"6"),
             ({"jpg": rgb}, b"x"), ({"jpg": truncated}, b"x"), ({"jpg": encode(90, 90, seed=5)}, b"7")]
    calls: list[bool] = []

    def spy(payload):
        out = decode_on_host(payload)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(shards, "decode_on_host", spy)
    max_pixels = 80 * 80  # the 90×90 JPEG is too large for both paths
    fast = DecodeStage(SkipCounter(), CheapView(SIZE), max_pixels, with_label=True)
    pil = DecodeStage(SkipCounter(), lambda img: CheapView(SIZE)(img), max_pixels, with_label=True)
    assert fast.to_tensor and not pil.to_tensor

    def outcome(stage: DecodeStage, sample: dict):
        try:
            return stage.convert(sample)["image"]
        except SampleError as err:
            return err.reason

    for i, (members, label) in enumerate(cases):
        sample = {"__key__": f"s{i}", "cls": label, **members}
        got, want = outcome(fast, sample), outcome(pil, sample)
        assert type(got) is type(want) and (got == want if isinstance(want, str) else torch.equal(got, want)), i
    reasons = [outcome(pil, {"__key__": "k", "cls": label, **members}) for members, label in cases]
    assert [r if isinstance(r, str) else "ok" for r in reasons] == [
        "ok", "ok", "ok", "ok", "corrupt_image", "corrupt_image", "bad_label", "bad_label", "too_large"]
    # torchvision decoded the RGB and greyscale JPEGs; the truncated one failed there and went to PIL
    assert calls == [True, True, False]


def test_no_deprecation_warning_per_image():
    """torchvision ≥ 0.29 warns on every decode_jpeg call that its codecs move to TorchCodec; a loader must not
    repeat that once per image."""
    rgb = encode(50, 70, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_on_host(rgb) is not None
        assert DeviceDecoder(SIZE, torch.device("cpu"))._decode([torch.frombuffer(bytearray(rgb), dtype=torch.uint8)])


def test_without_torchvision_jpeg_decode(monkeypatch):
    """A torchvision without decode_jpeg (its codecs are deprecated since 0.29): the loader's squares come from PIL,
    pixel for pixel the same, and data.device_decode is refused with the reason, not an ImportError."""
    monkeypatch.setattr(device_decode, "decode_jpeg", None)
    rgb = encode(50, 70, seed=1)
    stage = DecodeStage(SkipCounter(), CheapView(SIZE), BIG, with_label=False)
    assert not stage.to_tensor and decode_on_host(rgb) is None
    assert torch.equal(stage.convert({"__key__": "k", "jpg": rgb})["image"], cpu_square(rgb))
    with pytest.raises(ConfigError, match="data.device_decode: this torchvision has no torchvision.io.decode_jpeg"):
        load_config(None, ["data.device_decode=true", "data.device_aug=true"])
