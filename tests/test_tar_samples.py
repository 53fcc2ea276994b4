"""Shards → raw samples (`TarSamples`, webdataset's tar reading): whole shards of every tar format and
compression read as written, meta and non-file members left out, nothing decoded; a shard cut short anywhere,
damaged, empty or not a tar is one counted read error, never a traceback, with the samples before the break
kept."""

import io
import random
import tarfile
from pathlib import Path

import pytest

from ssl_vit.data.samples import SKIP_REASONS
from ssl_vit.data.tar_samples import SkipCounter, TarSamples

LONG_DIR = "d" * 60 + "/" + "e" * 70  # a path over 100 characters: ustar prefix, GNU long name or pax path
FORMATS = {"gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT, "ustar": tarfile.USTAR_FORMAT}


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mtime = kind, 1_700_000_000
    if kind == tarfile.SYMTYPE:
        info.linkname = "elsewhere"
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _tar(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT, mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=fmt) as tar:
        for name, data in members:
            _add(tar, name, data)
    return buf.getvalue()


def _read(path: Path) -> tuple[list[dict], dict[str, int]]:
    counter = SkipCounter()
    samples = list(TarSamples(counter)([{"url": str(path)}]))
    return samples, dict(zip(SKIP_REASONS, counter.pending, strict=True))


def _keys(samples: list[dict]) -> list[str]:
    return [s["__key__"] for s in samples]


def _pairs(n: int, size: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """n samples of an image-sized member (incompressible bytes) and a label, under a long folder name."""
    rng = random.Random(seed)
    return [m for i in range(n) for m in ((f"{LONG_DIR}/s{i}.jpg", rng.randbytes(size)),
                                          (f"{LONG_DIR}/s{i}.cls", b"%d" % i))]


def _no_skips(**counts: int) -> dict[str, int]:
    return {reason: counts.get(reason, 0) for reason in SKIP_REASONS}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["w", "w:gz", "w:bz2", "w:xz"])
def test_whole_shards_read_as_written(tmp_path, fmt, mode):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=FORMATS[fmt]) as tar:
        _add(tar, "s000.jpg", bytes(range(256)) * 3)
        _add(tar, "s000.cls", b"7")
        _add(tar, "a_dir", kind=tarfile.DIRTYPE)
        _add(tar, "a_link", kind=tarfile.SYMTYPE)
        _add(tar, "__meta__", b"webdataset's metadata, never a sample")
        _add(tar, "__index__/s9.jpg", b"under a metadata folder")
        _add(tar, f"{LONG_DIR}/s001.jpg", b"x" * 1000)
        _add(tar, f"{LONG_DIR}/s001.CLS", b"3")  # extensions are lower-cased
        _add(tar, "no_extension", b"no key")
        _add(tar, "s002.png", b"")  # an empty member
        _add(tar, "s002.pyd", b"\x80\x04 a pickle: handed on as bytes, never loaded")
    path = tmp_path / "shard.tar"
    path.write_bytes(buf.getvalue())
    samples, skipped = _read(path)
    assert _keys(samples) == ["s000", f"{LONG_DIR}/s001", "s002"] and skipped == _no_skips()
    assert samples[0]["jpg"] == bytes(range(256)) * 3 and samples[0]["cls"] == b"7"
    assert samples[1]["cls"] == b"3" and samples[2]["png"] == b""
    assert samples[2]["pyd"].startswith(b"\x80\x04")
    assert all(isinstance(v, bytes) for s in samples for k, v in s.items() if not k.startswith("__"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_cut_is_a_read_error_wherever_it_falls(tmp_path, fmt):
    data = _tar(_pairs(3, 700), FORMATS[fmt])
    members = tarfile.open(fileobj=io.BytesIO(data)).getmembers()
    end = members[-1].offset_data + 512  # the end-of-archive block (the last member's data fits one block)
    (tmp_path / "whole.tar").write_bytes(data)
    keys = _keys(_read(tmp_path / "whole.tar")[0])
    assert len(keys) == 3
    path = tmp_path / "cut.tar"
    for cut in sorted({*range(0, end + 1024, 97), *range(0, end + 1024, 512), *range(1, end + 1024, 512),
                       *range(511, end + 1024, 512)}):
        path.write_bytes(data[:cut])
        samples, skipped = _read(path)
        whole = cut >= end + 512  # tarfile needs one of the two end blocks
        assert skipped == _no_skips(read_error=0 if whole else 1), cut
        assert _keys(samples) == keys[:len(samples)], cut  # the samples before the cut, in order
        assert not whole or len(samples) == 3
        assert [bool(s.get("__cut__")) for s in samples] == [False] * len(samples[:-1]) + [not whole] * bool(samples)


@pytest.mark.parametrize("mode", ["w:gz", "w:bz2", "w:xz"])
def test_a_compressed_shard_cut_anywhere_is_a_read_error(tmp_path, mode):
    data = _tar(_pairs(4, 3000), mode=mode)
    path = tmp_path / "cut.tar.x"
    for cut in range(0, len(data), 53):
        path.write_bytes(data[:cut])
        samples, skipped = _read(path)
        # lost samples are counted; a cut in the compressed stream's last bytes (its trailer) loses nothing
        assert skipped == _no_skips(read_error=int(len(samples) < 4)), cut
        assert len(samples) < 4 or cut > len(data) - 100, cut


def test_a_damaged_header_is_a_read_error(tmp_path):
    # tarfile ends an archive quietly at a header that does not read (bad checksum, or zeros); the data after it
    # tells that the shard did not end there. Damage in the last 10 KB that tarfile reads ahead is not seen.
    data = _tar(_pairs(8, 4000))
    headers = [m.offset for m in tarfile.open(fileobj=io.BytesIO(data)).getmembers()]
    rng = random.Random(0)
    path = tmp_path / "damaged.tar"
    for i, offset in enumerate(headers):
        if offset > len(data) - 3 * 10240:
            break
        for garbage in (bytes(512), rng.randbytes(512)):
            path.write_bytes(data[:offset] + garbage + data[offset + 512:])
            samples, skipped = _read(path)
            assert skipped == _no_skips(read_error=1) and len(samples) == (i + 1) // 2, offset


def test_empty_and_non_tar_files_are_a_read_error_and_an_empty_archive_is_none(tmp_path):
    for name, data in {"empty.tar": b"", "text.tar": b"not a tar file\n" * 50, "garbage.tar": bytes(range(256)) * 8,
                       "text.tar.gz": b"\x1f\x8b not gzip"}.items():
        (tmp_path / name).write_bytes(data)
        assert _read(tmp_path / name) == ([], _no_skips(read_error=1)), name
    (tmp_path / "zeros.tar").write_bytes(bytes(10240))  # a tar of no members, as `tarfile` writes one
    assert _read(tmp_path / "zeros.tar") == ([], _no_skips())


def test_a_duplicate_member_name_ends_the_shard_with_a_read_error(tmp_path):
    path = tmp_path / "dup.tar"
    path.write_bytes(_tar([("a.jpg", b"1"), ("b.jpg", b"2"), ("b.jpg", b"3"), ("c.jpg", b"4")]))
    samples, skipped = _read(path)
    assert _keys(samples) == ["a", "b"] and samples[1]["jpg"] == b"2" and skipped == _no_skips(read_error=1)


def test_shards_are_read_one_at_a_time(tmp_path):
    # a shard cut after its first sample's image: that sample ends with its shard, never merged with the next
    # shard's sample of the same key, and the next shard reads whole
    first, second = tmp_path / "a.tar", tmp_path / "b.tar"
    data = _tar([("k.jpg", b"A" * 600), ("k.cls", b"1")])
    first.write_bytes(data[:tarfile.open(fileobj=io.BytesIO(data)).getmembers()[1].offset])
    second.write_bytes(_tar([("k.cls", b"2"), ("k.jpg", b"B")]))
    counter = SkipCounter()
    samples = list(TarSamples(counter)([{"url": str(first)}, {"url": str(second)}]))
    assert [(s["jpg"][:1], s.get("cls"), bool(s.get("__cut__"))) for s in samples] == [(b"A", None, True),
                                                                                       (b"B", b"2", False)]
    assert counter.pending == list(_no_skips(read_error=1).values())
