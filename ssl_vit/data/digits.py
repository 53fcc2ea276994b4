"""`ssl-vit make-digits OUT`: scikit-learn's bundled handwritten digits (UCI optdigits, no download) as labelled
32 px shards, the check that a demo recipe learns on real images too (docs/small_data.md)."""

from __future__ import annotations

import io
import math
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ssl_vit.data.writer import shard_pattern, write_samples

DIGITS_CLASSES = [str(d) for d in range(10)]
DIGITS_SIZE = 32  # the demo recipes' model.img_size
_SPLIT_SEED = 0  # stratified 75/25 split: 1,347 train, 450 val
_VAL_FRACTION = 0.25


@dataclass
class DigitsData:
    train: str  # brace pattern of the 1,347 training images (labelled, so it is also the k-NN train set)
    val: str  # brace pattern of the 450 held-out images (the k-NN val set)
    n_train: int
    n_val: int
    classes: list[str]

    def pretrain_args(self) -> str:
        """The `--set` overrides that train and evaluate a recipe on these shards."""
        return " ".join(f"--set {shlex.quote(f'{key}={spec}')}" for key, spec in
                        (("data.train", self.train), ("eval.knn_train", self.train), ("eval.knn_val", self.val)))


def load_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, val images, val labels): uint8 (N, 8, 8) images on 0–255, labels int64."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as err:  # missing, or installed without a working scipy
        raise ImportError(f"the digits data needs scikit-learn: pip install ssl_vit[digits] ({err})") from None
    images, labels = load_digits(return_X_y=True)  # float 0–16, (1797, 64)
    pixels = np.rint(images.reshape(-1, 8, 8) * (255 / 16)).astype(np.uint8)
    x_train, x_val, y_train, y_val = train_test_split(pixels, labels.astype(np.int64), test_size=_VAL_FRACTION,
                                                      stratify=labels, random_state=_SPLIT_SEED)
    return x_train, y_train, x_val, y_val


def to_png(pixels: np.ndarray) -> bytes:
    """An 8×8 uint8 digit as a 32 px 3-channel PNG: bicubic upsampling, so strokes stay smooth under the crops."""
    img = Image.fromarray(pixels, "L").resize((DIGITS_SIZE, DIGITS_SIZE), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


def _samples(split: str, pixels: np.ndarray, labels: np.ndarray) -> Iterator[dict]:
    for i, (img, label) in enumerate(zip(pixels, labels, strict=True)):
        yield {"__key__": f"{split}_{i:06d}", "png": to_png(img), "cls": str(int(label)).encode("ascii")}


def write_digits(out: str | Path) -> DigitsData:
    """Write train-*.tar and val-*.tar (png + cls members, ~8 shards a split to share among workers and ranks)
    and classes.txt into `out`; the same bytes on every run."""
    out = Path(out)
    x_train, y_train, x_val, y_val = load_split()
    if (out / "classes.txt").is_file():  # write_samples refuses existing shards; this keeps classes.txt too
        raise ValueError(f"{out} already holds a classes.txt; choose an empty directory")
    patterns = {}
    for split, pixels, labels in (("train", x_train, y_train), ("val", x_val, y_val)):
        n_shards = write_samples(_samples(split, pixels, labels), out, split, max_count=math.ceil(len(labels) / 8))
        patterns[split] = shard_pattern(out, split, n_shards)
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in DIGITS_CLASSES))
    return DigitsData(patterns["train"], patterns["val"], len(y_train), len(y_val), DIGITS_CLASSES)
