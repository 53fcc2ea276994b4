"""Shard URLs from what users write: brace patterns, folders of `*.tar`, `.txt` lists, remote URLs."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import braceexpand

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def resolve_shards(spec: str | Sequence[str], allow_pipe: bool = False) -> list[str]:
    """Shard URLs from a brace pattern, a directory (its `*.tar`, sorted), a `.txt` list (one entry a line,
    relative paths relative to the list file) or a sequence of these. Remote URLs pass through untouched."""
    items = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    urls = [url for item in items for url in _resolve_item(str(item), allow_pipe, base=None)]
    if not urls:
        raise ValueError(f"no shards found in {spec!r}")
    return urls


def _resolve_item(item: str, allow_pipe: bool, base: Path | None) -> list[str]:
    urls = []
    for entry in braceexpand.braceexpand(item.strip()):
        if not entry:
            continue
        if entry.startswith("pipe:"):
            if not allow_pipe:
                raise ValueError(f"refusing shard URL {entry!r}: pipe: runs a shell command; set "
                                 "data.allow_pipe=true (--allow-pipe for knn, linear-probe and visualize) if you "
                                 "trust it")
            urls.append(entry)
        elif _URL.match(entry):
            urls.append(entry)
        else:
            urls += _resolve_local(entry, allow_pipe, base)
    return urls


def _resolve_local(entry: str, allow_pipe: bool, base: Path | None) -> list[str]:
    path = Path(entry.removeprefix("file:")).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar") if p.is_file())
        if not shards:
            raise ValueError(f"no *.tar shards in directory {path}")
        return shards
    if not path.is_file():  # a FIFO or device would block or never end the read
        raise FileNotFoundError(f"shard {path} is not a regular file" if path.exists() else f"shard not found: {path}")
    if path.suffix.lower() != ".txt":
        return [str(path)]
    if base is not None:
        raise ValueError(f"shard list {path} is named inside another shard list; lists do not nest")
    urls = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            urls += _resolve_item(line, allow_pipe, base=path.parent)
    return urls
