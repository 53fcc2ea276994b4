"""Reusable shared-memory batches (train_stream(reuse_memory=True)): a slot is reused only after its release,
and a pooled stream yields exactly the batches of an unpooled one, whether the consumer releases or not."""

import io
import pickle
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch
from PIL import Image

from ssl_vit.config.pretrain import DataConfig
from ssl_vit.data import batch_pool
from ssl_vit.data.batch_pool import BatchPool, PooledBatch, released_after_use
from ssl_vit.data.collate import collate
from ssl_vit.data.samples import SKIP_REASONS
from ssl_vit.data.shards import train_stream
from ssl_vit.data.writer import write_samples
from ssl_vit.methods.mae.transforms import mae_views


def _group(value: int, n: int = 3, shape: tuple[int, ...] = (2, 4)) -> list[torch.Tensor]:
    return [torch.full(shape, value + i, dtype=torch.uint8) for i in range(n)]


def test_slot_is_reused_only_after_release():
    pool = BatchPool(slots=2)
    (a,), lease_a = pool.stack([_group(10)])
    (b,), lease_b = pool.stack([_group(20)])
    assert a.is_shared() and b.is_shared()
    assert pool.stack([_group(30)]) is None  # both held: the caller falls back to fresh memory
    assert torch.equal(a[:, 0, 0], torch.tensor([10, 11, 12], dtype=torch.uint8))  # untouched

    lease_a.release()
    (c,), lease_c = pool.stack([_group(40)])
    assert lease_c.slot == lease_a.slot and c.data_ptr() == a.data_ptr()  # the released buffer, reused
    assert torch.equal(c[:, 0, 0], torch.tensor([40, 41, 42], dtype=torch.uint8))
    assert torch.equal(b[:, 0, 0], torch.tensor([20, 21, 22], dtype=torch.uint8))  # still held: untouched

    lease_b.release()
    lease_b.release()  # idempotent
    (d, e), _ = pool.stack([_group(50, shape=(3, 3)), _group(60, n=3, shape=(1,))])  # new layout: new buffers
    assert d.shape == (3, 3, 3) and e.shape == (3, 1) and d.is_shared()
    assert torch.equal(e[:, 0], torch.tensor([60, 61, 62], dtype=torch.uint8))


def test_crops_of_channels_last_images_stack_channels_last():
    # device augmentation's square: a crop of an (H, W, C) image, its rows W·C apart; stacked as a transpose it
    # took 75 µs an image at 256 px in a loader worker; row by row into (B, H, W, C) memory the copy is 5 µs
    hwc = [torch.randint(0, 256, (12, 15, 3), dtype=torch.uint8) for _ in range(4)]
    crops = [x.permute(2, 0, 1)[:, 1:11, 2:12] for x in hwc]
    (stack,), _ = BatchPool(slots=1).stack([crops])
    assert stack.is_contiguous(memory_format=torch.channels_last) and torch.equal(stack, torch.stack(crops))
    (plain,), _ = BatchPool(slots=1).stack([[c.contiguous() for c in crops]])
    assert plain.is_contiguous() and torch.equal(plain, stack)
    # unpooled (num_workers=0, or a pool's slots all held): the same layout, in ordinary memory outside a worker
    fresh = collate([{"image": c, "skipped": [0] * len(SKIP_REASONS)} for c in crops])["image"]
    assert fresh.is_contiguous(memory_format=torch.channels_last) and not fresh.is_contiguous()
    assert torch.equal(fresh, stack) and not fresh.is_shared()


def test_collate_pools_every_stack_of_multi_crop_views():
    skipped = [0] * len(SKIP_REASONS)
    samples = [{"image": [torch.full((3, 4, 4), i), torch.full((3, 2, 2), 10 + i)], "skipped": skipped}
               for i in range(3)]
    pool = BatchPool(slots=1)
    batch = collate(samples, pool)
    plain = collate(samples)
    assert "lease" in batch and "lease" not in plain
    for pooled, fresh in zip(batch["image"], plain["image"], strict=True):
        assert torch.equal(pooled, fresh) and pooled.is_shared()
    assert "lease" not in collate(samples, pool)  # the one slot is held: fresh memory, no lease
    batch["lease"].release()
    assert "lease" in collate(samples, pool)


def test_with_zero_slots_a_pool_is_refused():
    with pytest.raises(ValueError, match="at least one slot"):
        BatchPool(slots=0)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("pool_shards")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(40):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
        samples.append({"__key__": f"s{i:03d}", "png": buf.getvalue()})
    write_samples(samples, out, "train", max_count=10)
    return str(out)


def _batches(shards: str, reuse: bool, release: bool, n: int = 12) -> list[tuple[torch.Tensor, int | None]]:
    """The first `n` image batches and the pool slot each came in; cloned before release when releasing, kept as
    they are otherwise (so that an overwrite of a held batch would show)."""
    cfg = DataConfig(train=shards, batch_size=4, num_workers=1, shuffle_buffer=16)
    stream = iter(train_stream(cfg, mae_views(16, (0.3, 1.0)), rank=0, world_size=1, seed=5, reuse_memory=reuse))
    out = []
    for _ in range(n):
        batch = next(stream)
        lease = batch.get("lease")
        out.append((batch["image"].clone() if release else batch["image"], lease.slot if lease is not None else None))
        if release and lease is not None:
            lease.release()
    return out


def test_pooled_stream_equals_plain_stream_with_and_without_release(shards):
    plain = _batches(shards, reuse=False, release=False)
    released = _batches(shards, reuse=True, release=True)
    held = _batches(shards, reuse=True, release=False)
    assert {slot for _, slot in plain} == {None}
    for (want, _), (got, _), (kept, _) in zip(plain, released, held, strict=True):
        assert torch.equal(got, want) and torch.equal(kept, want)
    # PIL views are (C, H, W) views of (H, W, C) memory: batches keep that layout (a copy, not a transpose),
    # pooled or not, and a worker's unpooled batch is made in shared memory (no second copy to hand it over)
    for batch in (held[0][0], plain[0][0], held[-1][0]):  # pooled, a plain loader's, after the pool ran full
        assert batch.is_contiguous(memory_format=torch.channels_last) and not batch.is_contiguous()
        assert batch.is_shared()
    slots = [slot for _, slot in released]
    assert None not in slots and len(set(slots)) < len(slots)  # every batch pooled, buffers reused
    held_slots = [slot for _, slot in held]
    assert held_slots[:4] == [0, 1, 2, 3] and set(held_slots[4:]) == {None}  # pool full: fresh memory after


def test_released_after_use_releases_the_previous_batch_on_next():
    pool = BatchPool(slots=1)

    def stream():
        for value in range(3):
            pooled = pool.stack([_group(value)])
            assert pooled is not None, "the previous batch was not released before the next was made"
            (stack,), lease = pooled
            yield {"image": stack, "lease": lease}

    seen = [int(batch["image"][0, 0, 0]) for batch in released_after_use(stream()) if "lease" not in batch]
    assert seen == [0, 1, 2]


def test_a_pooled_batch_crosses_with_its_buffers_only_the_first_time():
    """Each tensor a worker hands over costs a file-descriptor handshake on both sides: a slot's buffers cross
    once, later batches in that slot name it, and labels and skip counts travel as numbers."""
    pool = BatchPool(slots=2)

    def batch(value: int) -> dict:
        samples = [{"image": torch.full((3, 4, 4), value + i, dtype=torch.uint8), "label": value + i,
                    "key": f"k{value + i}", "skipped": [value + i] * len(SKIP_REASONS)} for i in range(3)]
        return collate(samples, pool)

    sent = [bytes(ForkingPickler.dumps(PooledBatch(batch(value), pool))) for value in (10, 20)]  # slots 0 and 1
    received = [pickle.loads(data) for data in sent]
    received[0]["lease"].release()
    again = bytes(ForkingPickler.dumps(PooledBatch(batch(30), pool)))  # slot 0 once more
    assert all(b"rebuild_storage" in data for data in sent) and b"rebuild_storage" not in again
    assert pool.name in batch_pool._RECEIVED
    third = pickle.loads(again)
    assert third["image"].data_ptr() == received[0]["image"].data_ptr()  # the slot's buffer, kept from before
    for got, value in [(received[1], 20), (third, 30)]:
        assert torch.equal(got["image"][:, 0, 0, 0], torch.tensor([value, value + 1, value + 2], dtype=torch.uint8))
        assert got["label"].tolist() == [value, value + 1, value + 2] and got["key"][0] == f"k{value}"
        assert got["skipped"].dtype == torch.long and got["skipped"][:, 0].tolist() == got["label"].tolist()
    assert third["lease"].slot == 0 and third["lease"].flags.is_shared()
    third["lease"].release()
    assert pool.flags.tolist() == [0, 1]  # the worker sees the release through the flags that crossed
    assert [b["label"][0].item() for b in released_after_use(iter(received[1:]))] == [20]
    assert pool.name not in batch_pool._RECEIVED  # the stream is over: its pools' memory is let go


def test_what_stack_new_does_not_take_is_collated_as_default_collate_does():
    skipped = [0] * len(SKIP_REASONS)
    cases = {
        "numbers": [3, 4],
        "mixed dtypes": [torch.zeros(2, dtype=torch.uint8), torch.ones(2, dtype=torch.float32)],
        "with grad": [torch.zeros(2, requires_grad=True), torch.ones(2, requires_grad=True)],
        "meta device": [torch.zeros(2, device="meta"), torch.zeros(2, device="meta")],
    }
    for name, images in cases.items():
        got = collate([{"image": x, "skipped": skipped} for x in images])["image"]
        want = torch.utils.data.default_collate(images)
        assert got.dtype == want.dtype and got.device == want.device and got.requires_grad == want.requires_grad, name
        if got.device.type != "meta":
            assert torch.equal(got.detach(), want.detach()), name


def test_a_worker_pool_takes_only_what_stack_new_takes():
    # inside a reuse_memory worker the pool stacks first: a caller's own transform returning numbers still gets
    # default_collate's batch, not an error, and leaves the pool's slot free
    pool = BatchPool(slots=1)
    batch = collate([{"image": n, "skipped": [0] * len(SKIP_REASONS)} for n in (3, 4)], pool)
    assert torch.equal(batch["image"], torch.tensor([3, 4])) and "lease" not in batch
    assert pool.flags.tolist() == [0]
