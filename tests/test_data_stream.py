"""Data streams: skip counting of corrupt samples and damaged shards (exact counts), the endless train stream,
its reproducibility and its split by rank and worker."""

from __future__ import annotations

import gzip
import io
import itertools
import tarfile
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_data import _counts, _image, _read_all, _size_of, _truncated, _two_views, _write_tar

from ssl_vit.config.pretrain import DataConfig
from ssl_vit.data import shards
from ssl_vit.data.samples import SKIP_REASONS
from ssl_vit.data.shards import eval_stream, share_of_shards, train_stream
from ssl_vit.data.tar_samples import NoUsableSamples
from ssl_vit.data.transforms import eval_transform
from ssl_vit.data.writer import write_samples
from ssl_vit.methods.mae.transforms import mae_views


def _corrupt_shards(tmp_path: Path) -> list[str]:
    good = _image("PNG", (8, 8))
    a = _write_tar(tmp_path / "a.tar", [
        ("g1.png", good), ("g1.cls", b"1"),
        ("trunc.jpg", _truncated(_image("JPEG", (64, 64)))),
        ("g2.png", good),
        ("text.jpg", b"this is not a jpeg"),
        ("g3.png", good), ("g3.cls", b"2"),
        ("labelonly.cls", b"3"),
        ("g4.png", good),
        ("badlabel.png", good), ("badlabel.cls", b"cat"),
    ])
    b = _write_tar(tmp_path / "b.tar", [
        ("g5.png", good), ("huge.png", _image("PNG", (100, 100))),
        ("g6.png", good), ("truncpng.png", _truncated(_image("PNG", (64, 64)))),
    ])
    lost = _image("PNG", (64, 64))  # the shard breaks off inside this member: one read_error, and x's cls that
    # did arrive is not counted again (as no_image)
    c = _write_tar(tmp_path / "c.tar", [("g7.png", good), ("g8.png", good), ("x.cls", b"4"), ("x.png", lost)],
                   cut_last=True)
    return [str(a), str(b), str(c)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_stream_skips_and_counts_bad_samples(tmp_path: Path, num_workers: int) -> None:
    loader = eval_stream(_corrupt_shards(tmp_path), _size_of, batch_size=2, num_workers=num_workers, rank=0,
                         world_size=1, max_image_pixels=5000)
    keys, labels, _, skipped = _read_all(loader)
    assert sorted(keys) == [f"g{i}" for i in range(1, 9)]  # g7, g8 precede the cut in the truncated tar
    assert labels["g1"] == 1 and labels["g3"] == 2 and labels["g2"] == -1
    assert skipped == _counts(read_error=1, no_image=1, corrupt_image=3, too_large=1, bad_label=1)


def test_a_cut_between_samples_leaves_the_last_whole_sample_counted_as_it_is(tmp_path: Path) -> None:
    # the shard breaks off in the first member of sample c: b is whole, and its corrupt image still counts
    shard = _write_tar(tmp_path / "s.tar", [("a.cls", b"1"), ("a.png", _image("PNG")), ("b.cls", b"2"),
                                            ("b.png", b"not a png"), ("c.cls", b"3" * 600)], cut_last=True)
    keys, _, _, skipped = _read_all(eval_stream(str(shard), _size_of, batch_size=4, num_workers=0, rank=0,
                                                world_size=1))
    assert keys == ["a"] and skipped == _counts(read_error=1, corrupt_image=1)


@pytest.mark.parametrize("where", ["at a header", "inside a header"])
def test_a_cut_between_members_counts_one_read_error_and_drops_the_torn_sample(tmp_path: Path, where: str) -> None:
    # image before label: b's image arrived, its label did not; tarfile would end such a shard quietly
    shard = _write_tar(tmp_path / "s.tar", [("a.png", _image("PNG")), ("a.cls", b"1"), ("b.png", _image("PNG")),
                                            ("b.cls", b"2"), ("c.png", _image("PNG")), ("c.cls", b"3")])
    b_cls = tarfile.open(shard).getmembers()[3].offset
    shard.write_bytes(shard.read_bytes()[:b_cls + (0 if where == "at a header" else 100)])
    keys, labels, _, skipped = _read_all(eval_stream(str(shard), _size_of, batch_size=4, num_workers=0, rank=0,
                                                     world_size=1))
    assert keys == ["a"] and labels == {"a": 1} and skipped == _counts(read_error=1)
    # pretraining needs no label: the torn sample's image is whole, and it is used. A batch is a pass over the
    # shard, one read error each (the first batch also carries the second pass's: a sample is held until the next)
    cfg = DataConfig(train=str(shard), batch_size=2, num_workers=0, shuffle_buffer=0)
    batches = list(itertools.islice(train_stream(cfg, _size_of, rank=0, world_size=1, seed=0), 4))
    assert [len(b["image"]) for b in batches] == [2] * 4
    assert [b["skipped"].sum(0).tolist() for b in batches[1:]] == [list(_counts(read_error=1).values())] * 3


def test_a_compressed_shard_cut_inside_a_sample_counts_one_read_error(tmp_path: Path) -> None:
    # webdataset reads .tar.gz shards and does not say where they broke off: the last sample counts as torn
    noisy = io.BytesIO()
    Image.effect_noise((128, 128), 50).convert("RGB").save(noisy, format="PNG")  # incompressible: a long member
    raw = _write_tar(tmp_path / "s.tar", [("g1.cls", b"1"), ("g1.png", _image("PNG")), ("x.cls", b"4"),
                                          ("x.png", noisy.getvalue())]).read_bytes()
    x_png = tarfile.open(fileobj=io.BytesIO(raw)).getmembers()[-1]
    packed = gzip.compress(raw, compresslevel=1, mtime=0)
    for end in range(len(packed), 0, -64):  # the longest cut whose data stops inside x.png
        out = zlib.decompressobj(31).decompress(packed[:end])
        if x_png.offset_data < len(out) < x_png.offset_data + x_png.size:
            break
    (tmp_path / "cut.tar.gz").write_bytes(packed[:end])
    keys, _, _, skipped = _read_all(eval_stream(str(tmp_path / "cut.tar.gz"), _size_of, batch_size=4,
                                                num_workers=0, rank=0, world_size=1))
    assert keys == ["g1"] and skipped == _counts(read_error=1)  # not also no_image for x's cls


def test_a_shard_that_is_not_a_tar_is_named_in_its_read_error_warning(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    shard = tmp_path / "notes.tar"
    shard.write_bytes(b"not a tar file at all " * 3)
    with caplog.at_level("WARNING", logger="ssl_vit.data.tar_samples"):
        keys, _, _, skipped = _read_all(eval_stream(str(shard), _size_of, batch_size=4, num_workers=0, rank=0,
                                                    world_size=1))
    assert keys == [] and skipped == _counts(read_error=1)
    assert caplog.messages == [f"skipping the rest of shard {shard} after a read error: truncated header"]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_eval_stream_counts_the_skips_of_a_worker_with_no_usable_sample(tmp_path: Path, num_workers: int) -> None:
    # with 2 workers, worker 1 reads only the bad shard: it has no sample to carry its counts on
    good = _write_tar(tmp_path / "a.tar", [("g1.png", _image("PNG")), ("g2.png", _image("PNG"))])
    bad = _write_tar(tmp_path / "b.tar", [("x1.jpg", b"junk"), ("x2.png", b"junk"), ("x3.cls", b"1")])
    loader = eval_stream([str(good), str(bad)], _size_of, batch_size=4, num_workers=num_workers, rank=0,
                         world_size=1)
    keys, _, _, skipped = _read_all(loader)
    assert sorted(keys) == ["g1", "g2"] and skipped == _counts(corrupt_image=2, no_image=1)
    lone = eval_stream([str(bad)], _size_of, batch_size=4, num_workers=num_workers, rank=0, world_size=1)
    assert _read_all(lone)[0] == [] and _read_all(lone)[3] == _counts(corrupt_image=2, no_image=1)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_stream_skips_and_counts_bad_samples(tmp_path: Path, num_workers: int) -> None:
    # One pass over this shard yields 4 good samples; a bad label does not matter for pretraining.
    shard = _write_tar(tmp_path / "t.tar", [
        ("g1.png", _image("PNG")), ("x1.cls", b"1"),
        ("g2.png", _image("PNG")), ("x2.jpg", _truncated(_image("JPEG", (64, 64)))),
        ("g3.png", _image("PNG")), ("g3.cls", b"nope"), ("x3.png", _image("PNG", (100, 100))),
        ("g4.png", _image("PNG")), ("x4.png", _image("PNG", (64, 64))),  # cut off: read_error
    ], cut_last=True)
    cfg = DataConfig(train=str(shard), batch_size=4, num_workers=num_workers, shuffle_buffer=0,
                     max_image_pixels=5000)
    loader = train_stream(cfg, eval_transform(8, 1.0), rank=0, world_size=1, seed=0)
    batches = list(itertools.islice(loader, 3))
    # without shuffling every batch is exactly one pass over the shard, bad samples included
    assert [b["skipped"].sum(0).tolist() for b in batches] == [[1, 1, 1, 1, 0]] * 3


def test_train_stream_gives_up_on_unreadable_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards, "_MAX_FRUITLESS", 50)
    shard = _write_tar(tmp_path / "bad.tar", [("x.jpg", b"junk")])
    loader = train_stream(DataConfig(train=str(shard), batch_size=2, num_workers=0), eval_transform(8, 1.0),
                          rank=0, world_size=1, seed=0)
    with pytest.raises(ValueError, match="no usable sample"):
        next(iter(loader))


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("kind", ["empty", "random", "no_image"])
def test_an_unusable_lone_shard_warns_once_and_ends_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture, kind: str,
                                                                 num_workers: int) -> None:
    # issue #20: a resampled bad shard warned on every pass, then a worker's traceback came through as the error
    monkeypatch.setattr(shards, "_MAX_FRUITLESS", 50)
    shard = tmp_path / f"{kind}.tar"
    if kind == "no_image":
        _write_tar(shard, [(f"s{i}.txt", b"hello") for i in range(5)])
    else:
        shard.write_bytes(b"" if kind == "empty" else torch.randint(256, (20_000,), dtype=torch.uint8,
                                                                   generator=torch.Generator().manual_seed(0))
                          .numpy().tobytes())
    cfg = DataConfig(train=str(shard), batch_size=2, num_workers=num_workers, shuffle_buffer=10)
    with caplog.at_level("WARNING", logger="ssl_vit.data.tar_samples"), pytest.raises(NoUsableSamples) as err:
        next(iter(train_stream(cfg, eval_transform(8, 1.0), rank=0, world_size=1, seed=0)))
    reasons = "no_image=51" if kind == "no_image" else "read_error=51"
    assert str(err.value) == (f"no usable sample in {shard}: 51 skipped in a row ({reasons}); are they tar shards "
                              "of jpg/png/webp images?")
    if num_workers == 0:  # a worker's log records do not reach caplog
        why = {"empty": "empty file", "random": "invalid header"}.get(kind)
        assert caplog.messages == ([f"skipping the rest of shard {shard} after a read error: {why}"] if why else [])


def test_the_give_up_message_names_at_most_three_shards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards, "_MAX_FRUITLESS", 20)
    for i in range(5):
        _write_tar(tmp_path / f"{i}.tar", [])  # valid and empty: no skip reason, but no progress either
    cfg = DataConfig(train=str(tmp_path), batch_size=2, num_workers=0, shuffle_buffer=0)
    with pytest.raises(NoUsableSamples, match=r"^no usable sample in (\S+\.tar, ){2}\S+\.tar and 2 more shards: 21 "
                                              r"skipped in a row \(empty shards\); are"):
        next(iter(train_stream(cfg, eval_transform(8, 1.0), rank=0, world_size=1, seed=0)))


def test_train_stream_is_endless_and_batched(tmp_path: Path) -> None:
    samples = ({"__key__": f"s{i}", "png": _image("PNG", (10, 14))} for i in range(5))
    write_samples(samples, tmp_path, "train")
    cfg = DataConfig(train=str(tmp_path), batch_size=4, num_workers=2, shuffle_buffer=10)
    loader = train_stream(cfg, mae_views(8, (0.2, 1.0)), rank=1, world_size=2, seed=3)
    batches = list(itertools.islice(loader, 3))
    for batch in batches:
        assert batch["image"].shape == (4, 3, 8, 8) and batch["image"].dtype == torch.uint8
        assert batch["skipped"].shape == (4, len(SKIP_REASONS)) and batch["skipped"].dtype == torch.long
        assert "label" not in batch
    cfg = DataConfig(train=str(tmp_path), batch_size=2, num_workers=0)
    multi = next(iter(train_stream(cfg, _two_views, rank=0, world_size=1, seed=0)))
    assert isinstance(multi["image"], list) and [v.shape for v in multi["image"]] == [(2, 3, 8, 8)] * 2


def test_train_stream_reproducible_per_start_step(tmp_path: Path) -> None:
    for shard in range(3):
        samples = ({"__key__": f"s{i}", "png": _image("PNG", (10, 10), (shard * 80, i * 40, 7))}
                   for i in range(6))
        write_samples(samples, tmp_path, f"part{shard}")
    cfg = DataConfig(train=str(tmp_path), batch_size=4, num_workers=2, shuffle_buffer=8)

    def first_batches(start_step: int) -> list[torch.Tensor]:
        loader = train_stream(cfg, mae_views(8, (0.2, 1.0)), rank=0, world_size=1, seed=0,
                              start_step=start_step)
        return [b["image"] for b in itertools.islice(loader, 3)]

    again, resumed = first_batches(0), first_batches(7)
    assert all(torch.equal(a, b) for a, b in zip(first_batches(0), again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(again, resumed, strict=True))


def test_train_shards_split_by_rank_then_worker() -> None:
    urls = [f"s{i}" for i in range(10)]
    seen = []
    for rank in range(2):
        for worker in range(2):
            share = share_of_shards(share_of_shards(urls, rank, 2), worker, 2)
            assert share
            seen += share
    assert sorted(seen) == sorted(urls)  # disjoint and complete
    assert share_of_shards(["a"], 1, 2) == ["a"]  # fewer shards than ranks: everyone samples them all
