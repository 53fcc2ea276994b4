"""Image folder → WebDataset tar shards (`ssl-vit make-shards`), labels kept when the folder has them."""

from __future__ import annotations

import glob
import io
import logging
import os
import random
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from ssl_vit.config.pretrain import DataConfig
from ssl_vit.data.samples import SampleError, open_image, to_rgb

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 256 << 20  # larger source files are skipped unread: raw RGB at the readers' pixel limit
_EXTS = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}  # stored member extension
# webdataset's `tar_file_iterator` (skip_meta): members named like this are metadata, never read as samples
_META = re.compile(r"__[^/]*__($|/)")


@dataclass
class ShardSummary:
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
    """Write {"__key__": str, ext: bytes, ...} samples to out/{prefix}-%06d.tar, the same bytes for the same samples,
    named only once all are written (docs/data.md); returns the number of shards."""
    out = Path(out)
    if not prefix or "/" in prefix or "%" in prefix:
        raise ValueError(f"shard prefix must be a plain name without '/' or '%', got {prefix!r}")
    if max_count < 1 or max_size < 1:
        raise ValueError(f"max_count and max_size must be ≥ 1, got {max_count} and {max_size}")
    existing = sorted(out.glob(f"{glob.escape(prefix)}-*.tar")) if out.is_dir() else []
    if existing:
        raise ValueError(f"{out} already holds {prefix} shards ({existing[0].name}, ...); "
                         "choose an empty directory or another prefix")
    out.mkdir(parents=True, exist_ok=True)
    _remove_parts(out, prefix)  # of a killed run
    writer, n_shards = None, None  # opened lazily: ShardWriter creates its first shard on construction
    try:
        for sample in samples:
            if writer is None:
                # PAX: member names longer than ustar's 100 characters; int mtime: no per-member pax header
                writer = wds.ShardWriter(str(out).replace("%", "%%") + f"/.{prefix}-%06d.tar.part",
                                         maxcount=max_count, maxsize=max_size, verbose=0, encoder=False, mtime=0,
                                         format="PAX_FORMAT")
            writer.write(sample)
        n_shards = 0 if writer is None else writer.shard  # before close(), which deletes it
    finally:
        if writer is not None:
            writer.close()
        if n_shards is None:  # an error or Ctrl-C: no shard names, no leftovers
            _remove_parts(out, prefix)
    for i in range(n_shards):
        os.replace(out / f".{prefix}-{i:06d}.tar.part", out / f"{prefix}-{i:06d}.tar")
    return n_shards


def _remove_parts(out: Path, prefix: str) -> None:
    for part in out.glob(f".{glob.escape(prefix)}-{'[0-9]' * 6}.tar.part"):
        part.unlink(missing_ok=True)


def _find_images(src: Path) -> list[Path]:
    """Images under src, sorted by relative path: symlinked folders followed (loops not), hidden entries skipped."""
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
    """A unique sample key from a relative path, without dots (webdataset splits at the first) and without a first
    folder named like `__x__` (read as metadata): `__background__/a` becomes `_background__/a`."""
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


def _encode(data: bytes, ext: str, max_side: int | None, max_pixels: int) -> tuple[bytes, str]:
    """Check that `data` decodes (raises if not) within the readers' pixel limit; downsize so the short side is
    max_side when it is larger."""
    img = open_image(data, max_pixels)
    w, h = img.size
    if max_side is None or min(w, h) <= max_side:
        img.draft("RGB", (1, 1))  # JPEG: decode at 1/8 scale, which still reads (and checks) every byte
        img.load()
        return data, ext
    scale = max_side / min(w, h)
    size = (max_side, round(h * scale)) if w <= h else (round(w * scale), max_side)
    img.draft("RGB", size)  # JPEG: decode at the smallest power-of-two scale still ≥ the target size
    buf = io.BytesIO()
    to_rgb(img).resize(size, Image.Resampling.LANCZOS).save(buf, format="JPEG" if ext == "jpg" else "PNG",
                                                            quality=95)  # PNG ignores quality
    return buf.getvalue(), "jpg" if ext == "jpg" else "png"


def write_shards(src: str | Path, out: str | Path, *, prefix: str = "train", max_count: int = 10_000,
                 max_size: int = 1 << 30, max_side: int | None = None, shuffle: bool = True, seed: int = 0,
                 progress: bool = True, max_file_bytes: int = MAX_FILE_BYTES,
                 max_pixels: int = DataConfig.max_image_pixels) -> ShardSummary:
    """Pack every jpg/jpeg/png/webp under `src` into shards in `out`; labels, skipped files, order and `max_side`
    as docs/data.md ("Making shards") describes."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"image folder not found: {src}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be ≥ 1 or None, got {max_side}")
    files = _find_images(src)
    if not files:
        raise ValueError(f"no jpg/jpeg/png/webp images under {src}")
    irregular = [f for f in files if not f.is_file()]  # a FIFO would block the read, /dev/zero never end it
    if irregular:
        log.warning("skipping %d image names that are not regular files (FIFOs, devices, broken links), e.g. %s",
                    len(irregular), irregular[0])
        files = [f for f in files if f.is_file()]
    if shuffle:
        random.Random(seed).shuffle(files)  # same folder + seed → same shards
    rels = [f.relative_to(src) for f in files]
    stray = sorted(r.as_posix() for r in rels if len(r.parts) == 1)
    if stray and len(stray) < len(rels):  # one stray image makes the whole folder unlabeled: say why
        log.warning("%d of %d images sit at the top of %s (e.g. %s), not in a class sub-folder: writing all "
                    "unlabeled; move or remove them to keep the sub-folder names as classes",
                    len(stray), len(rels), src, stray[0])
    classes = None if stray else sorted({r.parts[0] for r in rels})
    classes_file = out / "classes.txt"  # splits may share a folder, but only with one class list
    if classes is not None and classes_file.is_file() and classes_file.read_text().splitlines() != classes:
        raise ValueError(f"{classes_file} already lists other classes than the {len(classes)} sub-folders of this "
                         "source; write to another directory")
    failed: list[Path] = []  # unreadable or undecodable, left out

    def samples() -> Iterator[dict]:
        used: set[str] = set()
        index = {name: i for i, name in enumerate(classes or [])}
        for path, rel in tqdm(list(zip(files, rels, strict=True)), disable=not progress, unit="img",
                              desc=f"{prefix} shards"):
            try:
                if (size := path.stat().st_size) > max_file_bytes:
                    raise SampleError("too_large", f"{size} bytes > {max_file_bytes} bytes")
                data, ext = _encode(path.read_bytes(), _EXTS[path.suffix.lower()], max_side, max_pixels)
            except Exception as err:  # unreadable or undecodable: PIL raises many exception types
                # UnidentifiedImageError's own message names the in-memory buffer, not the file
                why = ("not a JPEG, PNG or WEBP image (empty, or another format)"
                       if isinstance(err, Image.UnidentifiedImageError) else
                       str(err) if isinstance(err, SampleError) else f"{type(err).__name__}: {err}")
                log.warning("skipping %s: %s", path, why)
                failed.append(path)
                continue
            sample = {"__key__": _make_key(rel, used), ext: data}
            if classes is not None:
                sample["cls"] = str(index[rel.parts[0]]).encode("ascii")
            yield sample

    n_shards = write_samples(samples(), out, prefix, max_count, max_size)
    n_samples = len(files) - len(failed)
    if n_samples == 0:
        raise ValueError(f"none of the {len(files) + len(irregular)} images under {src} could be read")
    if classes is not None:
        classes_file.write_text("".join(f"{c}\n" for c in classes))
    pattern = shard_pattern(out, prefix, n_shards)
    return ShardSummary(n_samples, n_shards, len(failed) + len(irregular), classes, pattern)
