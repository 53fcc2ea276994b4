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


class NoUsableSamples(ValueError):
    """A stream that finds no usable sample, in one line also where torch re-raises it from a loader worker."""

    def __init__(self, message: str) -> None:
        # torch re-raises a worker's error as its type, built from "Caught ... Original Traceback ...": keep our line
        super().__init__(message.rpartition(f"{NoUsableSamples.__name__}: ")[2].strip())


class SkipCounter:
    """Per-worker skip counts; each yielded sample takes those since the previous one, so summing
    `batch["skipped"]` gives exact totals without an inter-process channel."""

    def __init__(self, give_up_after: int | None = None) -> None:
        self.pending = [0] * len(SKIP_REASONS)
        self.read_errors = 0  # all time: tells `TarSamples` that a shard broke off
        self.fruitless = 0  # failures (and empty shards) since the last good sample
        self.fruitless_shards: set[str] = set()  # where they came from, for the give-up message
        self.warned: set[str] = set()  # shards whose read error was logged: a resampled shard warns once
        self.give_up_after = give_up_after

    def add(self, reason: str, url: str | None = None) -> None:
        self.pending[SKIP_REASONS.index(reason)] += 1
        self.no_progress(url)

    def no_progress(self, url: str | None = None) -> None:
        self.fruitless += 1
        self.fruitless_shards.add(url or "<unknown>")
        if self.give_up_after is not None and self.fruitless > self.give_up_after:
            names = sorted(self.fruitless_shards)
            where = ", ".join(names[:3]) + (f" and {len(names) - 3} more shards" if len(names) > 3 else "")
            reasons = ", ".join(f"{r}={n}" for r, n in zip(SKIP_REASONS, self.pending, strict=True) if n)
            raise NoUsableSamples(f"no usable sample in {where}: {self.fruitless} skipped in a row "
                                  f"({reasons or 'empty shards'}); are they tar shards of jpg/png/webp images?")

    def take(self) -> list[int]:
        out = self.pending
        self.pending = [0] * len(SKIP_REASONS)
        self.fruitless = 0
        self.fruitless_shards = set()
        return out

    def read_error(self, exn: Exception, url: str | None = None) -> bool:
        """webdataset handler: count, log (once per shard), stop reading this shard (its earlier samples stay)."""
        # webdataset appends the stream and URL to an error's args, and " @ <stream>" to its message
        message = str(exn.args[0] if exn.args and isinstance(exn.args[0], str) else exn)
        url = url or "<unknown>"
        (log.debug if url in self.warned else log.warning)(
            "skipping the rest of shard %s after a read error: %s", url, message.removesuffix(f" @ {url}"))
        self.warned.add(url)
        self.read_errors += 1
        self.add("read_error", url)
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
    """Shard dicts → raw samples, one shard at a time: a break is one read error, and the shard's last sample, maybe
    torn, is marked `__cut__` so that what it lacks is not counted again (docs/data.md, "Torn samples")."""

    def __init__(self, counter: SkipCounter) -> None:
        self.counter = counter

    def __call__(self, shards: Iterable[dict]) -> Iterator[dict]:
        for shard in shards:
            errors, last, opened = self.counter.read_errors, None, []  # opened: this shard's source, if it opens
            handler = partial(self.counter.read_error, url=shard.get("url"))  # so that its warning names the shard
            try:
                opened = [{**source, "stream": _WatchedStream(source["stream"], source["url"])}
                          for source in url_opener([dict(shard)], handler=handler)]
                for sample in group_by_keys(tar_file_expander(opened, handler=handler), handler=handler):
                    if last is not None:
                        yield last
                    last = sample
                damage = opened[0]["stream"].damage() if opened and self.counter.read_errors == errors else None
            finally:
                for source in opened:
                    source["stream"].close()
            if damage is not None:
                handler(tarfile.ReadError(damage))
            if last is None:
                if self.counter.read_errors == errors:  # an empty shard must not let a stream spin forever
                    self.counter.no_progress(shard.get("url"))
                continue
            if self.counter.read_errors != errors:
                last["__cut__"] = True
            yield last
