"""The COMPLETE marker of a checkpoint: written last, it vouches for the step and for every file beside it (size
and SHA-256), and carries a digest of itself, so that a file cut short, deleted or changed, or a marker edited,
makes the checkpoint incomplete instead of being trusted (docs/troubleshooting.md)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

COMPLETE = "COMPLETE"
PREFIX = "step_"
_TMP = f".{COMPLETE}.tmp"
_CHUNK = 1 << 22
_MAX_MARKER = 1 << 24


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _digest(marker: dict[str, Any]) -> str:
    body = {k: v for k, v in marker.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_marker(path: Path, step: int, extra: dict[str, Any] | None = None) -> None:
    """Mark the checkpoint directory `path` complete at `step`, vouching for the files it holds now. Written to a
    temp name and renamed: a torn marker would block every later resume and export."""
    files = {str(p.relative_to(path)): [p.stat().st_size, sha256(p)] for p in sorted(path.rglob("*"))
             if p.is_file() and p.name not in (COMPLETE, _TMP)}
    marker: dict[str, Any] = {"step": step, **(extra or {}), "files": files}
    marker["digest"] = _digest(marker)
    tmp = path / _TMP
    tmp.write_text(json.dumps(marker))
    os.replace(tmp, path / COMPLETE)


def read_marker(path: Path, checksums: bool = False) -> tuple[dict[str, Any] | None, str | None]:
    """(marker, None) if the checkpoint directory `path` is whole, else (None, what is wrong, in a few words naming
    the file). Sizes are always compared; `checksums` also reads every file (what a resume does, once)."""
    marker_file = path / COMPLETE
    # not a FIFO to hang on, nor /dev/zero to fill the memory with
    if not marker_file.is_file() or marker_file.stat().st_size > _MAX_MARKER:
        return None, f"its {COMPLETE} marker is not a regular file of at most {_MAX_MARKER >> 20} MiB"
    try:
        marker = json.loads(marker_file.read_text())
        if not isinstance(marker, dict):
            raise TypeError(f"a JSON {type(marker).__name__}, not an object")
    except (OSError, ValueError, TypeError) as err:
        return None, f"unreadable {COMPLETE} marker ({err})"
    if marker.get("digest") != _digest(marker) or not isinstance(marker.get("files"), dict):
        return None, f"its {COMPLETE} marker was edited or is from another version (its digest does not match)"
    step = marker.get("step")
    if not isinstance(step, int) or path.name != f"{PREFIX}{step:08d}":
        return None, f"its {COMPLETE} marker says step {step}, its directory {path.name}"
    for name, (size, checksum) in marker["files"].items():
        file = path / name
        if not file.is_file():
            return None, f"{name} is missing"
        if file.stat().st_size != size:
            return None, f"{name} has {file.stat().st_size} bytes, its {COMPLETE} marker says {size}"
        if checksums and sha256(file) != checksum:
            return None, f"{name} does not match the SHA-256 its {COMPLETE} marker holds"
    return marker, None
