"""Data layer: shard writer ↔ readers round trip, rank/worker splitting of the eval stream, demo data, views."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from ssl_vit.data.demo import DEMO_CLASSES, ensure_demo_data
from ssl_vit.data.samples import SKIP_REASONS, SampleError, decode_sample, read_label
from ssl_vit.data.shard_urls import resolve_shards
from ssl_vit.data.shards import eval_stream
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


def test_decode_sample_reasons() -> None:
    png = _image("PNG", (30, 20))
    img = decode_sample({"png": png, "cls": b"7\n"}, 1000)
    assert img.mode == "RGB" and img.size == (30, 20)
    assert read_label(b"7\n") == 7 and read_label(None) is None
    assert decode_sample({"jpg": _image("JPEG")}, 1000).mode == "RGB"
    for sample, pixels, reason in [({"txt": b"x"}, 1000, "no_image"), ({"png": png}, 599, "too_large"),
                                   ({"webp": b"RIFF...."}, 1000, "corrupt_image")]:
        with pytest.raises(SampleError) as err:
            decode_sample(sample, pixels)
        assert err.value.reason == reason
    for cls in (b"-1", b"\xff", b"9" * 19, b"1" * 5000):  # past int64 (or Python's digit limit): a counted skip
        with pytest.raises(SampleError) as err:
            read_label(cls)
        assert err.value.reason == "bad_label"
    assert read_label(b"9" * 18) == 10**18 - 1


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


def test_a_shard_spec_that_is_a_fifo_or_device_is_refused_unread(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "f.tar")
    os.symlink("/dev/zero", tmp_path / "list.txt")
    for name in ("f.tar", "list.txt"):
        with pytest.raises(FileNotFoundError, match=f"^shard {tmp_path / name} is not a regular file$"):
            resolve_shards(str(tmp_path / name))
