"""Data layer: shard writer ↔ readers round trip, rank/worker splitting, skip counting, demo data, views."""

from __future__ import annotations

import gzip
import io
import itertools
import os
import tarfile
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from ssl_vit.config.pretrain import DataConfig
from ssl_vit.data import shards
from ssl_vit.data.demo import DEMO_CLASSES, ensure_demo_data
from ssl_vit.data.samples import SKIP_REASONS, SampleError, decode_sample
from ssl_vit.data.shard_urls import resolve_shards
from ssl_vit.data.shards import eval_stream, train_stream
from ssl_vit.data.transforms import denormalize, eval_transform, normalize
from ssl_vit.data.writer import write_samples, write_shards
from ssl_vit.methods.mae.transforms import mae_views


def _image(fmt: str, size: tuple[int, int] = (12, 10), color: tuple[int, int, int] = (200, 40, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


def _truncated(data: bytes) -> bytes:
    return data[: len(data) // 2]


def _write_tar(path: Path, members: list[tuple[str, bytes]], cut_last: bool = False) -> Path:
    """A tar with these members; `cut_last` chops the file in the middle of the last member's data."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    if cut_last:
        with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
            last = tar.getmembers()[-1]
        raw = raw[: last.offset_data + last.size // 2]
    path.write_bytes(raw)
    return path


def _size_of(img: Image.Image) -> torch.Tensor:  # module level, so loader workers can use it
    return torch.tensor(img.size)


def _two_views(img: Image.Image) -> list[torch.Tensor]:
    t = eval_transform(8, 1.0)(img)
    return [t, t.flip(-1)]


def _read_all(loader) -> tuple[list[str], dict[str, int], dict[str, tuple[int, int]], dict[str, int]]:
    keys, labels, sizes, skipped = [], {}, {}, torch.zeros(len(SKIP_REASONS), dtype=torch.long)
    for batch in loader:
        # a batch of no samples carries the skip counts of a worker that found none (DecodeStage's lone_skips)
        assert batch["skipped"].shape == (len(batch["key"]) or 1, len(SKIP_REASONS))
        keys += batch["key"]
        labels.update(zip(batch["key"], batch["label"].tolist(), strict=True))
        sizes.update(zip(batch["key"], map(tuple, batch["image"].tolist()), strict=True))
        skipped += batch["skipped"].sum(0)
    return keys, labels, sizes, dict(zip(SKIP_REASONS, skipped.tolist(), strict=True))


def _counts(**kw: int) -> dict[str, int]:
    return {reason: kw.get(reason, 0) for reason in SKIP_REASONS}


def test_writer_round_trip_with_labels(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = {"cat/a.jpg": _image("JPEG", (40, 30)), "cat/b.JPEG": _image("JPEG", (9, 11)),
             "cat/nested/deep/c.png": _image("PNG", (13, 7)), "dog/x.y.png": _image("PNG", (5, 6)),
             "dog/w.webp": _image("WEBP", (16, 16)), "zebra/z.png": _image("PNG", (20, 10)),
             "dog/broken.jpg": b"not an image", "dog/notes.txt": b"ignored", "cat/.hidden.png": _image("PNG")}
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    out = tmp_path / "out"
    summary = write_shards(src, out, max_count=2, progress=False)
    assert (summary.n_samples, summary.n_shards, summary.n_skipped) == (6, 3, 1)
    assert summary.classes == ["cat", "dog", "zebra"]
    assert (out / "classes.txt").read_text() == "cat\ndog\nzebra\n"
    assert summary.pattern == f"{out}/train-{{000000..000002}}.tar"
    assert len(resolve_shards(summary.pattern)) == 3
    loader = eval_stream(summary.pattern, _size_of, batch_size=4, num_workers=0, rank=0, world_size=1)
    keys, labels, sizes, skipped = _read_all(loader)
    assert sorted(keys) == ["cat/a", "cat/b", "cat/nested/deep/c", "dog/w", "dog/x_y", "zebra/z"]
    assert labels == {"cat/a": 0, "cat/b": 0, "cat/nested/deep/c": 0, "dog/w": 1, "dog/x_y": 1, "zebra/z": 2}
    assert sizes == {"cat/a": (40, 30), "cat/b": (9, 11), "cat/nested/deep/c": (13, 7), "dog/w": (16, 16),
                     "dog/x_y": (5, 6), "zebra/z": (20, 10)}
    assert skipped == _counts()
    with pytest.raises(ValueError, match="already holds train shards"):
        write_shards(src, out, progress=False)


def test_writer_unlabeled_and_max_side(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    small = _image("PNG", (10, 12))
    (src / "top.jpg").write_bytes(_image("JPEG", (40, 30)))
    (src / "sub" / "small.png").write_bytes(small)
    (src / "sub" / "wide.png").write_bytes(_image("PNG", (90, 45)))
    out = tmp_path / "out"
    summary = write_shards(src, out, prefix="val", max_side=16, progress=False)
    assert summary.classes is None and not (out / "classes.txt").exists()
    keys, labels, sizes, _ = _read_all(eval_stream(summary.pattern, _size_of, batch_size=8, num_workers=0,
                                                   rank=0, world_size=1))
    assert set(labels.values()) == {-1}
    assert sizes == {"top": (21, 16), "sub/small": (10, 12), "sub/wide": (32, 16)}
    with tarfile.open(out / "val-000000.tar") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert members["sub/small.png"] == small  # not downsized: original bytes untouched
    assert sorted(members) == ["sub/small.png", "sub/wide.png", "top.jpg"]  # no cls members


@pytest.mark.parametrize("env", [{}, {"WORKER": "0", "NUM_WORKERS": "1"}])
def test_ranks_and_workers_read_each_sample_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 env: dict[str, str]) -> None:
    for name, value in env.items():  # webdataset's split_by_worker would believe these over the DataLoader
        monkeypatch.setenv(name, value)
    samples = ({"__key__": f"s{i:03d}", "png": _image("PNG", (4, 4)), "cls": str(i % 3).encode()}
               for i in range(37))
    assert write_samples(samples, tmp_path, "knn", max_count=5, max_size=1 << 20) == 8
    seen = []
    for rank in (0, 1):
        keys, *_ = _read_all(eval_stream(str(tmp_path), _size_of, batch_size=3, num_workers=2, rank=rank,
                                         world_size=2))
        seen.append(keys)
    assert not set(seen[0]) & set(seen[1]) and seen[0] and seen[1]
    assert sorted(seen[0] + seen[1]) == [f"s{i:03d}" for i in range(37)]


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


def test_decode_sample_reasons() -> None:
    png = _image("PNG", (30, 20))
    img, label = decode_sample({"png": png, "cls": b"7\n"}, 1000)
    assert img.mode == "RGB" and img.size == (30, 20) and label == 7
    assert decode_sample({"jpg": _image("JPEG")}, 1000)[1] is None
    for sample, pixels, reason in [({"txt": b"x"}, 1000, "no_image"), ({"png": png}, 599, "too_large"),
                                   ({"png": png, "cls": b"-1"}, 1000, "bad_label"),
                                   ({"webp": b"RIFF...."}, 1000, "corrupt_image")]:
        with pytest.raises(SampleError) as err:
            decode_sample(sample, pixels)
        assert err.value.reason == reason


def test_resolve_shards_forms(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"d-{i:06d}.tar").write_bytes(b"")
    (tmp_path / "other.txt").write_text("")
    expected = [str(tmp_path / f"d-{i:06d}.tar") for i in range(3)]
    assert resolve_shards(f"{tmp_path}/d-{{000000..000002}}.tar") == expected
    assert resolve_shards(str(tmp_path)) == expected
    listing = tmp_path / "list.txt"
    listing.write_text("# shards\nd-000000.tar\n\nd-{000001..000002}.tar\nhttps://host/x-000.tar\n")
    assert resolve_shards(listing) == expected + ["https://host/x-000.tar"]
    assert resolve_shards([expected[0], "s3://bucket/a.tar"]) == [expected[0], "s3://bucket/a.tar"]
    with pytest.raises(FileNotFoundError, match="d-000003.tar"):
        resolve_shards(f"{tmp_path}/d-{{000000..000003}}.tar")
    with pytest.raises(ValueError, match="data.allow_pipe=true"):
        resolve_shards("pipe:cat /x/a-{0..1}.tar")
    assert resolve_shards("pipe:cat /x/a-{0..1}.tar", allow_pipe=True) == ["pipe:cat /x/a-0.tar",
                                                                          "pipe:cat /x/a-1.tar"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no \\*.tar shards"):
        resolve_shards(tmp_path / "empty")
    with pytest.raises(ValueError, match="no shards found"):
        resolve_shards([])


def test_demo_data_deterministic_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = dict(n_train=30, n_knn_train=20, n_knn_val=10)
    first = ensure_demo_data(tmp_path / "a", **sizes)
    second = ensure_demo_data(tmp_path / "b", **sizes)
    assert first.classes == DEMO_CLASSES and len(DEMO_CLASSES) == 10
    for split in ("train", "knn_train", "knn_val"):
        paths_a, paths_b = resolve_shards(getattr(first, split)), resolve_shards(getattr(second, split))
        assert len(paths_a) >= 4
        assert [Path(p).read_bytes() for p in paths_a] == [Path(p).read_bytes() for p in paths_b]
    _, val_labels, sizes_seen, _ = _read_all(eval_stream(first.knn_val, _size_of, batch_size=4, num_workers=0,
                                                         rank=0, world_size=1))
    assert sorted(val_labels.values()) == list(range(10)) and set(sizes_seen.values()) == {(32, 32)}
    _, train_labels, _, _ = _read_all(eval_stream(first.train, _size_of, batch_size=8, num_workers=0, rank=0,
                                                  world_size=1))
    assert len(train_labels) == 30 and set(train_labels.values()) == {-1}
    _, knn_labels, _, _ = _read_all(eval_stream(first.knn_train, _size_of, batch_size=8, num_workers=0,
                                                rank=0, world_size=1))
    assert not set(knn_labels) & set(val_labels)  # different splits, different images
    marker = Path(first.train).parent / "demo.json"
    stamp = marker.stat().st_mtime_ns
    with monkeypatch.context() as patched:  # a cache hit generates nothing
        patched.setattr("ssl_vit.data.demo._generate", lambda *a, **k: pytest.fail("regenerated a cached set"))
        again = ensure_demo_data(tmp_path / "a", **sizes)
    assert again == first and marker.stat().st_mtime_ns == stamp
    other = ensure_demo_data(tmp_path / "a", n_train=20, n_knn_train=20, n_knn_val=10)
    assert Path(other.train).parent != Path(first.train).parent
    assert sorted(os.listdir(tmp_path / "a")) == sorted({Path(first.train).parent.name,
                                                         Path(other.train).parent.name})  # no temp dirs left


def test_views_and_transforms() -> None:
    img = Image.new("RGB", (50, 37), (255, 0, 128))
    view = mae_views(16, (0.2, 1.0))(img)
    assert type(view) is torch.Tensor and view.shape == (3, 16, 16) and view.dtype == torch.uint8
    assert torch.equal(view[:, 8, 8], torch.tensor([255, 0, 128], dtype=torch.uint8))  # a flat image stays flat
    assert torch.allclose(denormalize(normalize(view))[:, 8, 8], torch.tensor([1.0, 0.0, 128 / 255]), atol=1e-6)
    assert normalize(ev := eval_transform(8, 1.0)(img)) is ev  # float input: already normalised
    ev = eval_transform(32, 0.875)(img)
    assert ev.shape == (3, 32, 32)
    assert eval_transform(32, 1.0)(Image.new("RGB", (64, 64))).shape == (3, 32, 32)
    back = denormalize(eval_transform(8, 1.0)(img).unsqueeze(0))
    assert torch.allclose(back[0, :, 4, 4], torch.tensor([1.0, 0.0, 128 / 255]), atol=1e-2)


def test_train_shards_split_by_rank_then_worker() -> None:
    from ssl_vit.data.shards import share_of_shards

    urls = [f"s{i}" for i in range(10)]
    seen = []
    for rank in range(2):
        for worker in range(2):
            share = share_of_shards(share_of_shards(urls, rank, 2), worker, 2)
            assert share
            seen += share
    assert sorted(seen) == sorted(urls)  # disjoint and complete
    assert share_of_shards(["a"], 1, 2) == ["a"]  # fewer shards than ranks: everyone samples them all
