"""Tar shards → samples, reading the 512-byte headers directly instead of through Python's `tarfile`.

webdataset reads a shard with `tarfile` in stream mode, which builds a TarInfo, a file object and a buffered
reader for every member: about 63 µs a sample (a 73 KB JPEG and its label) on the test machine, 5–10% of a
loader worker's time once its images are cheap to process (device augmentation, device decode;
docs/benchmarks.md). This reader takes 21 µs.
It returns what webdataset's `tar_file_expander` returns, so webdataset's own `group_by_keys` still forms the
samples. It keeps `tarfile`'s rules for damaged shards but one:

- a header that is empty, short, fails its checksum or holds an unreadable number is a `tarfile.ReadError`
  (at the start of the file or right after a GNU long-name or pax header, as tarfile; elsewhere tarfile ends
  the archive quietly, but a shard that stops before its all-zero end-of-archive block was cut short or is
  damaged there, and whatever followed would be lost uncounted: the error carries the last member's name);
- a member whose data stops early is a `tarfile.ReadError` ("unexpected end of data").

Understood: ustar (with its name prefix), GNU long names, pax `path`/`size` records (local and global) and
base-256 sizes. Links, directories and devices are skipped like any non-regular member; GNU sparse files (old
GNU or pax format) are refused (a read error). Compressed shards (.tar.gz, .tar.bz2, .tar.xz) go through
`tarfile`, as before. Two differences, on purpose: a global pax `size` record is ignored (tarfile reports it as
every later member's size while still finding the next header by the member's own size, so it cuts or overruns
the data: only a damaged or hand-made archive holds one), and a member whose size is negative or runs past
the end of the file is a read error without the member (tarfile hands out its cut data first).
"""

from __future__ import annotations

import re
import sys
import tarfile
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from webdataset.tariterators import group_by_keys, tar_file_iterator, url_opener

BLOCK = 512
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz magic
_REGULAR = (b"0", b"\x00", b"7")
_SPARSE = b"S"
_LONG_NAME, _LONG_LINK = b"L", b"K"
_PAX_LOCAL, _PAX_GLOBAL = (b"x", b"X"), b"g"
_NO_DATA = (b"1", b"2", b"3", b"4", b"5", b"6")  # links, devices, directories, fifos: any size field is not data
_HIGH_BYTES = bytes(range(128, 256))
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")
_ENCODING = sys.getfilesystemencoding()  # what tarfile decodes names with
# webdataset's rule: top-level "__...__" files (and paths under "__...__/") are metadata, never samples
_META = re.compile(r"__[^/]*__($|/)")


def _text(field: bytes) -> str:
    end = field.find(b"\x00")
    return (field if end == -1 else field[:end]).decode(_ENCODING, "surrogateescape")


def _number(field: bytes) -> int:
    if field[0] in (0o200, 0o377):  # GNU base-256, for sizes of 8 GiB and more
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0o377 else value
    end = field.find(b"\x00")
    try:  # ASCII only, as tarfile: int() alone would also take other scripts' digits
        return int((field if end == -1 else field[:end]).decode("ascii").strip() or "0", 8)
    except ValueError:  # UnicodeDecodeError included
        raise tarfile.InvalidHeaderError("invalid header") from None


def _checksum_ok(head: bytes) -> bool:
    """`tarfile`'s rule: the stored sum matches the header's bytes (checksum field counted as 8 spaces) summed
    as unsigned or, as some old tars did, as signed chars. Whole-buffer C operations: a per-byte Python loop
    was half this reader's time."""
    stored = _number(head[148:156])
    unsigned = sum(head) - sum(head[148:156]) + 8 * 0x20
    if stored == unsigned:
        return True
    rest = head[:148] + head[156:]
    high = len(rest) - len(rest.translate(None, _HIGH_BYTES))  # bytes ≥ 128 count 256 less when signed
    return stored == unsigned - 256 * high


# The numeric fields `tarfile` parses in every header besides the size (mode, uid, gid, mtime, devmajor,
# devminor): one it cannot read ends the archive there (or fails at its start), even under a checksum that
# matches. Parsing them costs a third of this reader's time, and within a shard they hardly vary: the bytes
# of the ones seen good are remembered.
_OTHER_NUMBERS = ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345))
_GOOD_NUMBERS: set[bytes] = set()


def _other_numbers_ok(head: bytes) -> bool:
    seen = head[100:124] + head[136:148] + head[329:345]
    if seen in _GOOD_NUMBERS:
        return True
    for start, end in _OTHER_NUMBERS:
        _number(head[start:end])  # raises InvalidHeaderError
    if len(_GOOD_NUMBERS) > 4096:  # a shard of unusual headers must not grow it without bound
        _GOOD_NUMBERS.clear()
    _GOOD_NUMBERS.add(seen)
    return True


def _check(head: bytes) -> str | None:
    """Why `tarfile` would not take this block as a header ("end" for the all-zero end-of-archive block), or
    None for a good one."""
    if not head:
        return "empty file"
    if len(head) != BLOCK:
        return "truncated header"
    if head.count(0) == BLOCK:
        return "end"
    try:
        if not _checksum_ok(head):
            return "bad checksum"
        _number(head[124:136])
        _other_numbers_ok(head)
        return None
    except tarfile.InvalidHeaderError:
        return "invalid header"


def _pax_records(data: bytes) -> dict[str, str]:
    """A pax header's "length keyword=value\n" records, parsed as `tarfile` (3.11) does: up to the first
    thing that is not a record."""
    records, pos = {}, 0
    while match := _PAX_RECORD.match(data, pos):
        length, key = int(match.group(1)), match.group(2).decode("utf-8", "surrogateescape")
        if length == 0:
            raise tarfile.InvalidHeaderError("invalid header")
        records[key] = data[match.end():pos + length - 1].decode("utf-8", "surrogateescape")
        pos += length
    return records


def _apply_pax(records: dict[str, str], name: str, size: int) -> tuple[str, int]:
    """A member's name and size with pax records applied in order, by tarfile's rules (`_apply_pax_info`)."""
    for key, value in records.items():
        if key == "path":
            name = value.rstrip("/")
        elif key == "GNU.sparse.name":
            name = value
        elif key == "size":
            try:  # a pax size that is not a number counts as 0
                size = int(value)
            except ValueError:
                size = 0
    return name, size


def _is_sparse(records: dict[str, str]) -> bool:
    """The pax records of a GNU sparse member (formats 0.0, 0.1, 1.0), whose data holds a sparse map."""
    return ("GNU.sparse.map" in records or "GNU.sparse.size" in records
            or (records.get("GNU.sparse.major") == "1" and records.get("GNU.sparse.minor") == "0"))


_CHUNK = 1 << 26  # a damaged size field can claim up to 2**88 bytes: read large members in pieces, never at once


def _read_up_to(stream: IO[bytes], size: int) -> bytes:
    """At most `size` bytes (fewer at the end of the stream); memory grows only with what is really there."""
    if size <= _CHUNK:
        return stream.read(max(size, 0))
    parts = []
    while size > 0 and (part := stream.read(min(size, _CHUNK))):
        parts.append(part)
        size -= len(part)
    return b"".join(parts)


def _read_exactly(stream: IO[bytes], size: int) -> bytes:
    data = _read_up_to(stream, size)
    if len(data) != size:
        raise tarfile.ReadError("unexpected end of data")
    return data


def tar_members(stream: IO[bytes], first: bytes = b"") -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file of an uncompressed tar stream; `first`: its first bytes, already read."""
    head = first + stream.read(BLOCK - len(first))
    at_start, pending = True, False  # pending: a long-name or pax header waits for the member it describes
    last: str | None = None  # the last regular member read: its sample may be torn where the shard breaks off
    pax_global: dict[str, str] = {}
    # the GNU long names and local pax headers (each with the global records of its time) before a member
    extended: list[str | dict[str, str]] = []
    while True:
        problem = _check(head)
        if problem is not None:
            if pending:  # tarfile: a SubsequentHeaderError, whatever the problem
                raise _broken_off(f"subsequent header: {problem}", at_start, last)
            if problem == "end":
                return
            raise _broken_off(problem, at_start, last)
        kind, size = head[156:157], _number(head[124:136])
        if kind in (_LONG_NAME, _LONG_LINK, _PAX_GLOBAL, *_PAX_LOCAL):
            data = _read_up_to(stream, size + (-size) % BLOCK)  # as tarfile: the padded blocks, a name ends at its NUL
            try:
                if kind == _LONG_NAME:
                    extended.append(_text(data))
                elif kind == _PAX_GLOBAL:
                    pax_global.update(_pax_records(data))
                elif kind != _LONG_LINK:
                    extended.append({**pax_global, **_pax_records(data)})
            except tarfile.InvalidHeaderError:
                raise _broken_off("invalid header", at_start, last) from None
            at_start, pending = False, True
            head = stream.read(BLOCK)
            continue
        at_start = False
        raw_name, prefix = _text(head[:100]), _text(head[345:500])
        name = raw_name
        if prefix:  # ustar splits long names into prefix + name (tarfile reads the field whatever the magic)
            name = f"{prefix}/{raw_name}"
        # tarfile's order: the global pax records (their size left aside, see the module docstring), then the
        # extended headers from the one nearest the member out to the first, which therefore wins
        name, _ = _apply_pax(pax_global, name, size)
        for header in reversed(extended):
            if isinstance(header, str):  # a GNU long name
                name = header
            else:
                name, size = _apply_pax(header, name, size)
        sparse = any(isinstance(header, dict) and _is_sparse(header) for header in extended)
        extended, pending = [], False
        if kind == _SPARSE or sparse:  # old GNU or pax sparse format
            raise tarfile.ReadError(f"GNU sparse member {name!r} is not supported")
        if kind == b"\x00" and raw_name.endswith("/"):  # an old V7 directory: no data, like tarfile's DIRTYPE
            pass
        elif kind in _REGULAR:
            try:
                data = _read_exactly(stream, size)
            except tarfile.ReadError as err:
                err.member = name  # the member the shard broke off in: its sample is torn (shards._TarSamples)
                raise
            last = name
            yield name, data
            _read_exactly(stream, (-size) % BLOCK)
        elif kind not in _NO_DATA:
            _read_exactly(stream, size + (-size) % BLOCK)
        head = stream.read(BLOCK)


def _broken_off(problem: str, at_start: bool, last: str | None) -> tarfile.ReadError:
    """The read error of a shard whose headers stop being readable; `member`: the last member read before
    (None: none), whose sample may lack members that came after it (shards._TarSamples)."""
    if at_start:
        err = tarfile.ReadError(problem)
    else:
        problem = "the file ends without an end-of-archive block" if problem == "empty file" else problem
        after = f" after member {last!r}" if last is not None else ""
        err = tarfile.ReadError(f"{problem}{after}: the shard was cut short or is damaged")
    err.member = last
    return err


class _Replay:
    """A stream whose first bytes were already read: they are handed out again first."""

    def __init__(self, first: bytes, stream: IO[bytes]) -> None:
        self.first, self.stream = first, stream

    def read(self, size: int = -1) -> bytes:
        if not self.first:
            return self.stream.read(size)
        if size < 0:
            out, self.first = self.first + self.stream.read(), b""
            return out
        out, self.first = self.first[:size], self.first[size:]
        return out + (self.stream.read(size - len(out)) if len(out) < size else b"")


def is_meta_name(name: str) -> bool:
    """Whether webdataset (and this reader) takes a member of this name for metadata and never yields it."""
    return _META.match(name) is not None


def tar_file_expander(sources: Iterable[dict[str, Any]],
                      handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """webdataset's `tar_file_expander` with this reader: {"fname", "data", "__url__"} per regular file and {}
    after each shard's last one. An error is passed to `handler`; it returns True to go on with the next shard."""
    for source in sources:
        stream, url, compressed = source["stream"], source["url"], False
        try:
            first = stream.read(6)
            compressed = first.startswith(_COMPRESSED)
            if compressed:
                files = ((f["fname"], f["data"]) for f in tar_file_iterator(_Replay(first, stream), handler=handler))
            else:
                files = tar_members(stream, first)
            for name, data in files:
                if not is_meta_name(name):
                    yield {"fname": name, "data": data, "__url__": url}
            yield {}
        except Exception as exn:
            if not compressed and not hasattr(exn, "member"):
                exn.member = None  # this reader names the member whose data broke off (tar_members): none did here
            if not handler(exn):
                break
        finally:
            stream.close()


def tar_samples(shards: Iterable[dict[str, Any]], handler: Callable[[Exception], bool]) -> Iterator[dict[str, Any]]:
    """webdataset's `tarfile_samples` (open each {"url": ...}, read it, group files into samples by key) with
    this reader."""
    return group_by_keys(tar_file_expander(url_opener(shards, handler=handler), handler), handler=handler)
