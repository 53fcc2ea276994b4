"""Built-in demo data: ten classes of 32×32 shapes and textures, told apart by structure only, that an SSL method
learns in minutes on a CPU; each image a pure function of (split, index) (docs/data.md says why)."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ssl_vit.data.writer import shard_pattern, write_samples

DEMO_CLASSES: tuple[str, ...] = ("disc", "square", "triangle", "cross", "ring", "horizontal_stripes",
                                 "vertical_stripes", "diagonal_stripes", "checkerboard", "dots")
_VERSION = 2  # bump when the images change, so stale caches are not reused
_SIZE = 32
_S = 2 * _SIZE  # drawn at twice the size, then box-downsampled: cheap anti-aliasing
_SPLITS = {"train": 0, "knn_train": 1, "knn_val": 2}  # per-split seeds, so the three sets never repeat


@dataclass
class DemoData:  # shard specs (brace patterns) of the demo splits
    train: str  # unlabeled
    knn_train: str  # labelled (cls)
    knn_val: str  # labelled (cls)
    classes: tuple[str, ...]


def _rotate(points: np.ndarray, angle: float, center: np.ndarray) -> list[float]:
    c, s = math.cos(angle), math.sin(angle)
    return (points @ np.array([[c, s], [-s, c]]) + center).ravel().tolist()  # flat x, y, x, y … for PIL


def _shape_mask(cls: str, rng: np.random.Generator) -> np.ndarray:
    img = Image.new("L", (_S, _S), 0)
    draw = ImageDraw.Draw(img)
    center = rng.uniform(0.35, 0.65, size=2) * _S
    angle = math.radians(rng.uniform(-20, 20))
    if cls in ("disc", "ring"):
        r = rng.uniform(0.2, 0.34) * _S
        box = [center[0] - r, center[1] - r, center[0] + r, center[1] + r]
        if cls == "disc":
            draw.ellipse(box, fill=255)
        else:
            draw.ellipse(box, outline=255, width=max(2, round(rng.uniform(0.07, 0.11) * _S)))
    elif cls == "square":
        a = rng.uniform(0.18, 0.3) * _S
        draw.polygon(_rotate(np.array([[-a, -a], [a, -a], [a, a], [-a, a]]), angle, center), fill=255)
    elif cls == "triangle":
        r = rng.uniform(0.25, 0.38) * _S
        turns = np.array([0.0, 2 * math.pi / 3, 4 * math.pi / 3])
        corners = np.stack([r * np.sin(turns), -r * np.cos(turns)], axis=1)
        draw.polygon(_rotate(corners, angle, center), fill=255)
    else:  # cross
        arm, half = rng.uniform(0.22, 0.34) * _S, rng.uniform(0.06, 0.1) * _S
        for bar in ([[-arm, -half], [arm, -half], [arm, half], [-arm, half]],
                    [[-half, -arm], [half, -arm], [half, arm], [-half, arm]]):
            draw.polygon(_rotate(np.array(bar), angle, center), fill=255)
    return np.asarray(img) > 127


def _texture_mask(cls: str, rng: np.random.Generator) -> np.ndarray:
    if cls == "dots":
        yy, xx = np.mgrid[0:_S, 0:_S]
        mask = np.zeros((_S, _S), bool)
        for _ in range(int(rng.integers(6, 14))):
            cy, cx = rng.uniform(0, _S, size=2)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < (rng.uniform(0.045, 0.07) * _S) ** 2
        return mask
    base = {"horizontal_stripes": 0.0, "vertical_stripes": 90.0, "checkerboard": 0.0,
            "diagonal_stripes": float(rng.choice([45.0, -45.0]))}[cls]
    angle = math.radians(base + rng.uniform(-10, 10))
    yy, xx = np.mgrid[0:_S, 0:_S] - _S / 2
    u = xx * math.cos(angle) + yy * math.sin(angle)  # along the stripes
    v = -xx * math.sin(angle) + yy * math.cos(angle)  # across the stripes
    period = rng.uniform(0.14, 0.28) * _S
    phase_u, phase_v = rng.uniform(0, period, size=2)
    if cls == "checkerboard":
        return (np.floor((u + phase_u) / period) + np.floor((v + phase_v) / period)) % 2 == 0
    return (v + phase_v) % period < period / 2


def render(split: str, index: int) -> tuple[bytes, int]:
    """PNG bytes and class index of demo image `index` of `split` (a pure function of both)."""
    rng = np.random.default_rng([_VERSION, _SPLITS[split], index])
    label = index % len(DEMO_CLASSES)  # balanced classes; the loaders shuffle
    cls = DEMO_CLASSES[label]
    mask = _shape_mask(cls, rng) if label < 5 else _texture_mask(cls, rng)
    # levels and tint vary less than DINO's colour jitter, so colour never tells two images apart better than views
    fg, bg = rng.uniform(170, 255), rng.uniform(0, 85)
    tint = rng.uniform(0.9, 1.1, size=3)
    fg, bg = np.clip(fg * tint, 0, 255), np.clip(bg * tint, 0, 255)
    m = mask.astype(np.float32).reshape(_SIZE, 2, _SIZE, 2).mean(axis=(1, 3))[..., None]  # (32, 32, 1)
    pixels = m * fg + (1 - m) * bg + rng.normal(0.0, rng.uniform(0, 10), size=(_SIZE, _SIZE, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB").save(buf, format="PNG")
    return buf.getvalue(), label


def _samples(split: str, n: int) -> Iterator[dict]:
    for i in range(n):
        png, label = render(split, i)
        yield {"__key__": f"{split}_{i:06d}", "png": png, **({"cls": str(label).encode()} if split != "train" else {})}


def ensure_demo_data(root: str | Path | None = None, *, n_train: int = 20_000, n_knn_train: int = 5_000,
                     n_knn_val: int = 1_000) -> DemoData:
    """Generate the demo shards once (about 10 s) under `root` ($SSL_VIT_CACHE/demo or ~/.cache/ssl_vit/demo, a
    folder per set of sizes) and return their specs."""
    sizes = {"train": n_train, "knn_train": n_knn_train, "knn_val": n_knn_val}
    if min(sizes.values()) < 1:
        raise ValueError(f"demo split sizes must be ≥ 1, got {sizes}")
    if root is None:
        root = Path(os.environ.get("SSL_VIT_CACHE") or Path.home() / ".cache" / "ssl_vit") / "demo"
    final = Path(root).expanduser() / f"v{_VERSION}-{n_train}-{n_knn_train}-{n_knn_val}"
    marker = final / "demo.json"
    if not marker.is_file():
        _generate(final, sizes)
    meta = json.loads(marker.read_text())
    if meta.get("version") != _VERSION or meta.get("sizes") != sizes:
        raise ValueError(f"{marker} does not match this demo data ({meta}); delete {final} to regenerate it")
    patterns = {split: shard_pattern(final, split, n) for split, n in meta["shards"].items()}
    return DemoData(patterns["train"], patterns["knn_train"], patterns["knn_val"], DEMO_CLASSES)


def _generate(final: Path, sizes: dict[str, int]) -> None:
    """Write into a temporary folder and rename it, so a crash or a concurrent run never leaves half a set."""
    print(f"generating demo data ({sizes['train']} train, {sizes['knn_train']} k-NN train, "
          f"{sizes['knn_val']} k-NN val images) in {final}", file=sys.stderr, flush=True)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        shards = {}
        for split, n in sizes.items():
            per_shard = min(5000, math.ceil(n / 8))  # ~8 shards a split, to share among workers/ranks
            shards[split] = write_samples(_samples(split, n), tmp, split, max_count=per_shard)
        (tmp / "classes.txt").write_text("".join(f"{c}\n" for c in DEMO_CLASSES))
        meta = {"version": _VERSION, "sizes": sizes, "shards": shards}
        (tmp / "demo.json").write_text(json.dumps(meta, indent=1) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "demo.json").is_file():  # not a concurrent run that finished first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
