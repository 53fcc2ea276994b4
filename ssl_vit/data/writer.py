"""Image folder → WebDataset tar shards (`ssl-vit make-shards`), labels kept when the folder has them."""

from __future__ import annotations

import io
import logging
import os
import random
import re
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ssl_vit.data.samples import to_rgb

log = logging.getLogger(__name__)

_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}  # stored member extension
_FORMATS = ("JPEG", "PNG", "WEBP")
# webdataset's `tar_file_iterator` (skip_meta): members named like this are metadata, never read as samples
_META = re.compile(r"__[^/]*__($|/)")


@dataclass
class ShardSummary:
    """What `write_shards` wrote."""

    n_samples: int
    n_shards: int
    n_skipped: int  # unreadable source files, left out
    classes: list[str] | None  # class i = line i of out/classes.txt; None when the folder is unlabeled
    pattern: str  # brace pattern of the written shards, e.g. "out/train-{000000..000003}.tar"


def shard_pattern(out: str | Path, prefix: str, n_shards: int) -> str:
    """Brace pattern naming the `n_shards` shards written by `write_samples`."""
    return f"{Path(out)}/{prefix}-{{000000..{max(n_shards - 1, 0):06d}}}.tar"


def write_samples(samples: Iterable[dict], out: str | Path, prefix: str = "train", max_count: int = 10_000,
                  max_size: int = 1 << 30) -> int:
    """Write {"__key__": str, ext: bytes, ...} samples to out/{prefix}-%06d.tar; returns the number of shards.

    Tar headers carry a fixed mtime, so the same samples give byte-identical shards.
    """
    out = Path(out)
    if not prefix or "/" in prefix or "%" in prefix:
        raise ValueError(f"shard prefix must be a plain name without '/' or '%', got {prefix!r}")
    if max_count < 1 or max_size < 1:
        raise ValueError(f"max_count and max_size must be ≥ 1, got {max_count} and {max_size}")
    existing = sorted(out.glob(f"{prefix}-*.tar")) if out.is_dir() else []
    if existing:
        raise ValueError(f"{out} already holds {prefix} shards ({existing[0].name}, ...); "
                         "choose an empty directory or another prefix")
    out.mkdir(parents=True, exist_ok=True)
    pattern = str(out).replace("%", "%%") + f"/{prefix}-%06d.tar"
    writer = None  # opened lazily: ShardWriter creates its first (possibly empty) shard on construction
    try:
        for sample in samples:
            if writer is None:
                # PAX: member names longer than ustar's 100 characters; int mtime: no per-member pax header
                writer = wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_size, verbose=0,
                                         encoder=False, mtime=0, format="PAX_FORMAT")
            writer.write(sample)
        return 0 if writer is None else writer.shard
    finally:
        if writer is not None:
            writer.close()


def _find_images(src: Path) -> list[Path]:
    """Images under src (following symlinked folders, skipping hidden entries), sorted by relative path.

    A folder reached again below itself (a symlink loop) is not entered; one reached by two separate routes (two
    class folders linking to one place) is read under both, as the tree shows it."""
    found = []
    above = {str(src): {os.path.realpath(src)}}  # per folder: the real paths of it and of the folders above it
    for root, dirs, files in os.walk(src, followlinks=True):
        ancestors = above.pop(root)
        kept = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(root, d))
            if not d.startswith(".") and real not in ancestors:
                above[os.path.join(root, d)] = ancestors | {real}
                kept.append(d)
        dirs[:] = kept
        found += [Path(root, f) for f in files if not f.startswith(".") and Path(f).suffix.lower() in _EXTS]
    return sorted(found, key=lambda p: p.relative_to(src).as_posix())


def _make_key(rel: Path, used: set[str]) -> str:
    """A unique sample key from a relative path: no dots (webdataset splits key and extension at the first dot
    of the basename), hence no '..' either; and no first folder named like `__x__`, which webdataset's readers
    take for metadata and drop: `__background__/a` becomes `_background__/a`."""
    parts = [part.replace(".", "_") for part in rel.with_suffix("").parts]
    while _META.match("/".join(parts)):
        parts[0] = parts[0][1:]
    base = "/".join(parts)
    key, i = base, 0
    while key in used:
        i += 1
        key = f"{base}_{i}"
    used.add(key)
    return key


def _encode(data: bytes, ext: str, max_side: int | None) -> tuple[bytes, str]:
    """Check that `data` decodes (raises if not); downsize so the short side is max_side when it is larger."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the reader applies its own limit
        img = Image.open(io.BytesIO(data), formats=_FORMATS)
        w, h = img.size
        if max_side is None or min(w, h) <= max_side:
            img.draft("RGB", (1, 1))  # JPEG: decode at 1/8 scale, which still reads (and checks) every byte
            img.load()
            return data, ext
        scale = max_side / min(w, h)
        size = (max_side, round(h * scale)) if w <= h else (round(w * scale), max_side)
        img.draft("RGB", size)  # JPEG: decode at the smallest power-of-two scale still ≥ the target size
        img = to_rgb(img).resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if ext == "jpg":
        img.save(buf, format="JPEG", quality=95)
    else:
        img.save(buf, format="PNG")
        ext = "png"
    return buf.getvalue(), ext


def write_shards(src: str | Path, out: str | Path, *, prefix: str = "train", max_count: int = 10_000,
                 max_size: int = 1 << 30, max_side: int | None = None, shuffle: bool = True, seed: int = 0,
                 progress: bool = True) -> ShardSummary:
    """Pack every jpg/jpeg/png/webp under `src` into shards in `out`.

    When every image sits in a first-level sub-folder, the sorted folder names are the classes: each sample
    gets a `cls` member and out/classes.txt lists the names. Original bytes are stored untouched unless
    `max_side` asks for downsizing. Unreadable files are skipped, logged and counted. With `shuffle` (default)
    the files are written in an order shuffled by `seed`, so every shard mixes classes and folders: a stream's
    shuffle buffer only mixes the few shards a worker has open.
    """
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"image folder not found: {src}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be ≥ 1 or None, got {max_side}")
    files = _find_images(src)
    if not files:
        raise ValueError(f"no jpg/jpeg/png/webp images under {src}")
    if shuffle:
        random.Random(seed).shuffle(files)  # same folder + seed → same shards
    rels = [f.relative_to(src) for f in files]
    labelled = all(len(r.parts) > 1 for r in rels)
    _warn_of_top_level_images(src, rels)
    classes = sorted({r.parts[0] for r in rels}) if labelled else None
    if classes is not None:
        _check_classes_file(out / "classes.txt", classes)
    skipped = 0

    def samples() -> Iterator[dict]:
        nonlocal skipped
        used: set[str] = set()
        index = {name: i for i, name in enumerate(classes or [])}
        for path, rel in tqdm(list(zip(files, rels, strict=True)), disable=not progress, unit="img",
                              desc=f"{prefix} shards"):
            try:
                data, ext = _encode(path.read_bytes(), _EXTS[path.suffix.lower()], max_side)
            except Exception as err:  # unreadable or undecodable: PIL raises many exception types
                # UnidentifiedImageError's own message names the in-memory buffer, not the file
                why = ("not a JPEG, PNG or WEBP image (empty, or another format)"
                       if isinstance(err, Image.UnidentifiedImageError) else f"{type(err).__name__}: {err}")
                log.warning("skipping %s: %s", path, why)
                skipped += 1
                continue
            sample = {"__key__": _make_key(rel, used), ext: data}
            if classes is not None:
                sample["cls"] = str(index[rel.parts[0]]).encode("ascii")
            yield sample

    n_shards = write_samples(samples(), out, prefix, max_count, max_size)
    n_samples = len(files) - skipped
    if n_samples == 0:
        raise ValueError(f"none of the {len(files)} images under {src} could be read")
    if classes is not None:
        (out / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    return ShardSummary(n_samples, n_shards, skipped, classes, shard_pattern(out, prefix, n_shards))


def _warn_of_top_level_images(src: Path, rels: list[Path]) -> None:
    """Say why a folder of class folders comes out unlabeled: one stray image beside them is enough (a folder
    is labelled only when every image sits in a sub-folder), and the summary alone says only "unlabeled"."""
    stray = sorted(r.as_posix() for r in rels if len(r.parts) == 1)
    if stray and len(stray) < len(rels):
        log.warning("%d of %d images sit at the top of %s (e.g. %s), not in a class sub-folder: writing all "
                    "unlabeled; move or remove them to keep the sub-folder names as classes",
                    len(stray), len(rels), src, stray[0])


def _check_classes_file(path: Path, classes: list[str]) -> None:
    """Shards of several splits may share a folder, but only with one class list (labels are indices)."""
    if path.is_file() and path.read_text().splitlines() != classes:
        raise ValueError(f"{path} already lists other classes than the {len(classes)} sub-folders of this "
                         "source; write to another directory")
