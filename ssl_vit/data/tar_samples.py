"""Shards → raw samples through webdataset's tar reading, one shard at a time, each break counted as a read error."""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterable, Iterator
from functools import partial
from typing import IO

from webdataset.tariterators import group_by_keys, tar_file_expander, url_opener

from ssl_vit.data.samples import SKIP_REASONS

log = logging.getLogger(__name__)

_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz magic


class SkipCounter:
    """Per-worker skip counts; each yielded sample takes those since the previous one, so summing
    `batch["skipped"]` gives exact totals without an inter-process channel."""

    def __init__(self, give_up_after: int | None = None) -> None:
        self.pending = [0] * len(SKIP_REASONS)
        self.read_errors = 0  # all time: tells `TarSamples` that a shard broke off
        self.fruitless = 0  # failures (and empty shards) since the last good sample
        self.give_up_after = give_up_after

    def add(self, reason: str) -> None:
        self.pending[SKIP_REASONS.index(reason)] += 1
        self.no_progress()

    def no_progress(self) -> None:
        self.fruitless += 1
        if self.give_up_after is not None and self.fruitless > self.give_up_after:
            counts = dict(zip(SKIP_REASONS, self.pending, strict=True))
            raise ValueError(f"no usable sample in the last {self.give_up_after} tries (skips since the last "
                             f"good one: {counts}); the shards look unreadable")

    def take(self) -> list[int]:
        out = self.pending
        self.pending = [0] * len(SKIP_REASONS)
        self.fruitless = 0
        return out

    def read_error(self, exn: Exception, url: str | None = None) -> bool:
        """webdataset handler: count, log, and stop reading this shard (its earlier samples are kept)."""
        # webdataset appends the stream and URL to an error's args, and " @ <stream>" to its message
        message = str(exn.args[0] if exn.args and isinstance(exn.args[0], str) else exn)
        log.warning("skipping the rest of shard %s after a read error: %s", url or "<unknown>",
                    message.removesuffix(f" @ {url}"))
        self.read_errors += 1
        self.add("read_error")
        return False


class _WatchedStream:
    """A shard's bytes on their way to `tarfile`, which ends an archive quietly where a header is missing or does
    not read: `damage` says afterwards whether it was cut short or left data unread (docs/data.md)."""

    def __init__(self, stream: IO[bytes], url: str) -> None:
        self.stream, self.url, self.start, self.ran_out = stream, url, b"", False

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.start = self.start or data[:6]
        self.ran_out = self.ran_out or (size != 0 and not data)
        return data

    def __str__(self) -> str:  # what webdataset appends to an error's message: the shard, not an object's repr
        return self.url

    def damage(self) -> str | None:
        if self.ran_out:
            return "the shard ends without an end-of-archive block: it was cut short"
        if self.start and not self.start.startswith(_COMPRESSED):
            while chunk := self.stream.read(1 << 20):
                if chunk.strip(b"\x00"):
                    return "a header does not read and data follows it: the shard is damaged there"
        return None

    def close(self) -> None:
        self.stream.close()


class TarSamples:
    """Shard dicts → raw samples (webdataset's `url_opener`, `tar_file_expander`, `group_by_keys`), one shard at a
    time: a break is one read error, and the shard's last sample, maybe torn, is marked `__cut__` so that what
    it lacks is not counted again (see `DecodeStage`)."""

    def __init__(self, counter: SkipCounter) -> None:
        self.counter = counter

    def __call__(self, shards: Iterable[dict]) -> Iterator[dict]:
        for shard in shards:
            errors, last, opened = self.counter.read_errors, None, []
            handler = partial(self.counter.read_error, url=shard.get("url"))  # so that its warning names the shard
            try:
                sources = self._watched(url_opener([dict(shard)], handler=handler), opened)
                for sample in group_by_keys(tar_file_expander(sources, handler=handler), handler=handler):
                    if last is not None:
                        yield last
                    last = sample
                damage = opened[0].damage() if opened and self.counter.read_errors == errors else None
            finally:
                for stream in opened:
                    stream.close()
            if damage is not None:
                handler(tarfile.ReadError(damage))
            if last is None:
                self.counter.no_progress()  # an empty shard must not let a resampled stream spin forever
                continue
            if self.counter.read_errors != errors:
                last["__cut__"] = True
            yield last

    @staticmethod
    def _watched(sources: Iterable[dict], opened: list[_WatchedStream]) -> Iterator[dict]:
        for source in sources:
            opened.append(_WatchedStream(source["stream"], source["url"]))
            yield {**source, "stream": opened[-1]}
