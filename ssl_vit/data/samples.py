"""One WebDataset sample → (RGB image, label), or a SampleError naming why it cannot be used; nothing unpickled."""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
from PIL import Image

SKIP_REASONS: tuple[str, ...] = ("read_error", "no_image", "corrupt_image", "too_large", "bad_label")
IMAGE_EXTS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP")  # never let PIL try other (riskier) decoders, whatever the extension


class SampleError(ValueError):
    """A sample that cannot be used; `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def decode_sample(sample: dict, max_image_pixels: int) -> Image.Image:
    """The RGB image of a raw sample; SampleError(reason) if unusable (too large: refused from its header)."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None or not isinstance(sample[ext], (bytes, bytearray, memoryview)):
        raise SampleError("no_image", f"members {sorted(k for k in sample if not k.startswith('__'))}")
    try:
        return to_rgb(open_image(sample[ext], max_image_pixels))  # the full decode: truncated data fails here
    except SampleError:
        raise
    except Image.DecompressionBombError as err:
        raise SampleError("too_large", str(err)) from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, struct.error ... for broken data
        raise SampleError("corrupt_image", f"{type(err).__name__}: {err}") from None


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """`data` opened as a JPEG, PNG or WEBP (its header read, not decoded); SampleError("too_large") above
    `max_pixels` (PIL's own bomb check still applies on top)."""
    with warnings.catch_warnings():
        # our own pixel limit decides; PIL's warning threshold would silently override a larger one
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    if img.width * img.height > max_pixels:
        raise SampleError("too_large", f"{img.width}x{img.height} > {max_pixels} pixels")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB; 16-bit greyscale (medical, satellite PNGs) is rescaled, where PIL's convert would clip."""
    if img.mode.startswith("I;16") or img.mode == "I":
        scaled = (np.asarray(img, dtype=np.float32) / 257.0).round().clip(0, 255)
        img = Image.fromarray(scaled.astype(np.uint8))
    if img.mode == "RGB":  # convert() would copy the whole image; load() decodes it (and fails on bad data)
        img.load()
        return img
    return img.convert("RGB")


def read_label(data: Any) -> int | None:
    """The integer of a `cls` member (None without one); SampleError("bad_label") if it is not one."""
    if data is None:
        return None
    try:
        text = bytes(data).decode("ascii").strip()
    except (TypeError, UnicodeDecodeError):
        raise SampleError("bad_label", "cls member is not ASCII text") from None
    if not text.isdigit() or len(text) > 18:  # past int64, collation fails inside a loader worker
        raise SampleError("bad_label", f"cls {text[:20]!r} is not a non-negative integer below 10^18")
    return int(text)
