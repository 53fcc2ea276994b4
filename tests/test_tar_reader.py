"""The tar reader against webdataset's own (Python's tarfile): the same samples and the same errors, for every
tar format tarfile writes, long names, odd members, compression, and shards cut off or damaged anywhere, but
one difference on purpose: where tarfile ends a cut or damaged shard quietly, ours raises a read error."""

import io
import random
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from webdataset.handlers import reraise_exception

from ssl_vit.data.tar_reader import tar_samples

LONG_DIR = "d" * 60 + "/" + "e" * 70  # a path over 100 characters: ustar prefix, GNU long name or pax path


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mtime = kind, 1_700_000_000
    if kind == tarfile.SYMTYPE:
        info.linkname = "elsewhere"
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def _tar(fmt: int, mode: str = "w", pax_headers: dict | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=fmt, pax_headers=pax_headers or {}) as tar:
        _add(tar, "s000.jpg", bytes(range(256)) * 3)
        _add(tar, "s000.cls", b"7")
        _add(tar, "a_dir", kind=tarfile.DIRTYPE)
        _add(tar, "a_link", kind=tarfile.SYMTYPE)
        _add(tar, "__meta__", b"not a sample")
        _add(tar, f"{LONG_DIR}/s001.jpg", b"x" * 1000)
        _add(tar, f"{LONG_DIR}/s001.CLS", b"3")  # extensions are lower-cased
        _add(tar, "no_extension", b"skipped by the key rule")
        _add(tar, "s002.png", b"")  # an empty member
        _add(tar, "s002.txt", "ünïcode".encode())
        _add(tar, "s003.jpg", b"y" * 511)
        _add(tar, "s003.jpg", b"z")  # a duplicate name: webdataset raises, the handler sees it
        _add(tar, "s004.jpg", b"after the duplicate")
    return buf.getvalue()


def _read(path: Path, reader: str) -> tuple[list[dict], list[str]]:
    errors: list[str] = []

    def handler(exn: Exception) -> bool:
        errors.append(type(exn).__name__)
        return False

    shards = [{"url": str(path)}]
    if reader == "webdataset":
        samples = list(wds.tarfile_to_samples(handler=handler)(shards))
    else:
        samples = list(tar_samples(shards, handler))
    return samples, errors


def _same(path: Path) -> list[dict]:
    (ours, errors), (reference, their_errors) = _read(path, "ours"), _read(path, "webdataset")
    assert ours == reference and errors == their_errors
    return ours


def _same_but_broken_off(path: Path) -> tuple[list[dict], list[str]]:
    """A damaged shard: the same samples, and the same errors but where tarfile ends quietly (ours: ReadError)."""
    (ours, errors), (reference, their_errors) = _read(path, "ours"), _read(path, "webdataset")
    assert ours == reference
    assert errors == their_errors or (their_errors == [] and errors == ["ReadError"])
    return ours, errors


FORMATS = {"gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT, "ustar": tarfile.USTAR_FORMAT}


@pytest.mark.parametrize("fmt", FORMATS)
def test_whole_shards_read_the_same(tmp_path, fmt):
    path = tmp_path / "shard.tar"
    path.write_bytes(_tar(FORMATS[fmt]))
    samples = _same(path)
    assert [s["__key__"] for s in samples][:3] == ["s000", f"{LONG_DIR}/s001", "s002"]
    assert samples[1]["cls"] == b"3" and samples[0]["jpg"] == bytes(range(256)) * 3


def test_pax_global_header_and_compressed_shards(tmp_path):
    for name, data in {"global.tar": _tar(tarfile.PAX_FORMAT, pax_headers={"comment": "made by a test"}),
                       "zipped.tar.gz": _tar(tarfile.PAX_FORMAT, mode="w:gz")}.items():
        (tmp_path / name).write_bytes(data)
        assert len(_same(tmp_path / name)) >= 4


@pytest.mark.parametrize("fmt", FORMATS)
def test_cut_anywhere_reads_the_same(tmp_path, fmt):
    data = _tar(FORMATS[fmt])
    path = tmp_path / "cut.tar"
    cuts = sorted({*range(0, len(data), 97), *range(0, len(data), 512), *range(1, len(data), 512),
                   *range(511, len(data), 512)})
    for cut in cuts:
        path.write_bytes(data[:cut])
        assert _same_but_broken_off(path)[1]  # never read as a whole shard (some cuts meet the duplicate first)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_cut_is_a_read_error_wherever_it_falls(tmp_path, fmt):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=FORMATS[fmt]) as tar:
        for i in range(3):
            _add(tar, f"{LONG_DIR}/s{i}.jpg", bytes(range(256)) * (i + 1))
            _add(tar, f"{LONG_DIR}/s{i}.cls", b"%d" % i)
    data = buf.getvalue()
    members = tarfile.open(fileobj=io.BytesIO(data)).getmembers()
    end = members[-1].offset_data + 512  # the end-of-archive block (each member's data fits one block)
    path = tmp_path / "cut.tar"
    for cut in sorted({*range(0, end + 1024, 512), *range(300, end + 1024, 512)}):
        path.write_bytes(data[:cut])
        samples, errors = _same_but_broken_off(path)
        assert errors == ([] if cut >= end + 512 else ["ReadError"]), cut
    path.write_bytes(data[:members[3].offset])  # the cut falls just before s1.cls's headers
    with pytest.raises(tarfile.ReadError, match="ends without an end-of-archive block after member") as err:
        list(tar_samples([{"url": str(path)}], reraise_exception))
    assert err.value.member == f"{LONG_DIR}/s1.jpg"  # its sample may be torn (shards._TarSamples marks it)


def test_damaged_blocks_read_the_same(tmp_path):
    data = _tar(tarfile.PAX_FORMAT)
    rng = random.Random(0)
    path = tmp_path / "damaged.tar"
    for block in range(len(data) // 512):
        for garbage in (bytes(512), bytes(rng.randrange(256) for _ in range(512))):
            path.write_bytes(data[:block * 512] + garbage + data[(block + 1) * 512:])
            _same_but_broken_off(path)


def test_empty_and_non_tar_files_fail_the_same(tmp_path):
    for name, data in {"empty.tar": b"", "zeros.tar": bytes(2048), "text.tar": b"not a tar file\n" * 50}.items():
        (tmp_path / name).write_bytes(data)
        _same(tmp_path / name)
    assert _read(tmp_path / "empty.tar", "ours") == ([], ["ReadError"])


def _resum_signed(data: bytes) -> bytes:
    """Rewrite the checksum of every block with a byte ≥ 128 (only headers here: the data is ASCII) as old tars
    did, summing bytes as signed chars; tarfile accepts both sums."""
    out = bytearray(data)
    for start in range(0, len(out), 512):
        head = bytes(out[start:start + 512])
        if max(head) > 127:
            out[start + 148:start + 156] = b"%06o\x00 " % tarfile.calc_chksums(head)[1]
    return bytes(out)


def test_signed_checksums_and_non_ascii_names_read_the_same(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name in ("ünï/çödé.jpg", "ünï/çödé.cls", "plain.jpg"):
            _add(tar, name, b"ascii data")
    signed = _resum_signed(buf.getvalue())
    assert signed != buf.getvalue()  # the non-ASCII headers now carry a sum only the signed rule accepts
    for name, data in {"unsigned.tar": buf.getvalue(), "signed.tar": signed}.items():
        (tmp_path / name).write_bytes(data)
        samples = _same(tmp_path / name)
        assert [s["__key__"] for s in samples] == ["ünï/çödé", "plain"]
    # the second header (at 1024) with a sum that is neither: the archive breaks off there (tarfile: quietly)
    broken = bytearray(signed)
    broken[1024 + 148:1024 + 156] = b"%06o\x00 " % 1
    (tmp_path / "broken.tar").write_bytes(bytes(broken))
    samples, errors = _same_but_broken_off(tmp_path / "broken.tar")
    assert [s["__key__"] for s in samples] == ["ünï/çödé"] and errors == ["ReadError"]


def _with_checksum(block: bytearray) -> bytearray:
    block[148:156] = b"        "
    block[148:156] = b"%06o\x00 " % sum(block)
    return block


def test_damaged_fields_under_a_matching_checksum_read_the_same(tmp_path):
    # a field tarfile parses but this reader has no use for (mode, uid, gid, mtime, device numbers), damaged in
    # every header in turn with the checksum made to match: tarfile ends the archive there, and so must we (with
    # a read error, or the duplicate's error where that comes first)
    data = _tar(tarfile.USTAR_FORMAT)
    path = tmp_path / "fields.tar"
    headers = [m.offset for m in tarfile.open(fileobj=io.BytesIO(data)).getmembers()]
    for offset in headers:
        for start in (100, 108, 116, 136, 329, 337):
            damaged = bytearray(data)
            damaged[offset:offset + 512] = _with_checksum(bytearray(damaged[offset:offset + 512]))
            damaged[offset + start] = ord("9")  # not an octal digit
            damaged[offset:offset + 512] = _with_checksum(bytearray(damaged[offset:offset + 512]))
            path.write_bytes(bytes(damaged))
            assert _same_but_broken_off(path)[1]


def test_unicode_digits_in_a_header_number_break_the_archive_off_as_in_tarfile(tmp_path):
    data = bytearray(_tar(tarfile.USTAR_FORMAT))
    second = tarfile.open(fileobj=io.BytesIO(bytes(data))).getmembers()[1].offset
    data[second + 108:second + 110] = "٣".encode()  # an Arabic-Indic three in the uid: int() takes it, tarfile not
    data[second:second + 512] = _with_checksum(bytearray(data[second:second + 512]))
    (tmp_path / "digits.tar").write_bytes(bytes(data))
    samples, errors = _same_but_broken_off(tmp_path / "digits.tar")  # it ends at that header: s000 without its cls
    assert [s["__key__"] for s in samples] == ["s000"] and "cls" not in samples[0] and errors == ["ReadError"]


def _pax_tar(members: list[tuple[str, bytes, dict]], global_headers: dict | None = None,
             fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt, pax_headers=global_headers or {}) as tar:
        for name, data, records in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.pax_headers = len(data), 0, records
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


REST = [("a.cls", b"1", {}), ("b.jpg", b"B" * 10, {}), ("b.cls", b"2", {})]


@pytest.mark.parametrize("first", [
    ("a.jpg", b"A" * 700, {"size": "100"}),  # a pax size overrides the header's
    ("a.jpg", b"A" * 700, {"size": "junk"}),  # a size that is no number counts as 0
    ("a.jpg", b"A" * 7, {"path": "z.jpg/"}),  # a path loses trailing slashes
    ("a.jpg", b"A" * 7, {"GNU.sparse.name": "q.jpg"}),  # a name record of its own, not a sparse member
])
def test_pax_records_apply_as_tarfile_applies_them(tmp_path, first):
    (tmp_path / "pax.tar").write_bytes(_pax_tar([first, *REST]))
    samples, errors = _same_but_broken_off(tmp_path / "pax.tar")
    assert samples[0]["__key__"] in ("a", "z", "q")
    # a size that disagrees with the data leaves the next header inside it: the shard breaks off there
    assert errors == (["ReadError"] if "size" in first[2] else [])


def test_pax_global_path_and_a_pax_sparse_member(tmp_path):
    (tmp_path / "global.tar").write_bytes(_pax_tar([("a.jpg", b"A" * 7, {}), *REST], {"path": "g.jpg"}))
    assert [s["__key__"] for s in _same(tmp_path / "global.tar")] == ["g"]  # every member renamed: one key
    sparse = _pax_tar([("a.jpg", b"A" * 7, {"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}), *REST])
    (tmp_path / "sparse.tar").write_bytes(sparse)
    assert _read(tmp_path / "sparse.tar", "ours") == ([], ["ReadError"])  # its data starts with a sparse map


def test_a_long_name_and_a_pax_path_the_first_in_the_file_wins(tmp_path):
    def member(headers: list[tuple[bytes, bytes]]) -> bytes:
        out = b""
        for kind, payload in headers:  # each extended header: its block, then its data padded to blocks
            info = tarfile.TarInfo("././@LongLink" if kind == tarfile.GNUTYPE_LONGNAME else "./PaxHeader")
            info.type, info.size = kind, len(payload)
            out += info.tobuf(tarfile.USTAR_FORMAT) + payload + bytes(-len(payload) % 512)
        info = tarfile.TarInfo("short.jpg")
        info.size = 3
        return out + info.tobuf(tarfile.USTAR_FORMAT) + b"abc" + bytes(509)

    long, pax = (tarfile.GNUTYPE_LONGNAME, b"longname.jpg\x00"), (tarfile.XHDTYPE, b"21 path=paxname.jpg\n")
    for order, key in (([long, pax], "longname"), ([pax, long], "paxname")):
        (tmp_path / "order.tar").write_bytes(member(order) + bytes(1024))
        assert [s["__key__"] for s in _same(tmp_path / "order.tar")] == [key]


def test_a_gnu_long_name_shorter_than_its_size_field_says(tmp_path):
    data = bytearray(_pax_tar([(LONG_DIR + "/a.jpg", b"A" * 7, {}), *REST], fmt=tarfile.GNU_FORMAT))
    data[:512] = _with_checksum(bytearray(data[:512]))
    data[124:136] = b"%011o\x00" % 20  # the long name's size field: tarfile still reads the padded block to its NUL
    data[:512] = _with_checksum(bytearray(data[:512]))
    (tmp_path / "long.tar").write_bytes(bytes(data))
    assert _same(tmp_path / "long.tar")[0]["__key__"] == LONG_DIR + "/a"
