"""JPEG decode on the training device (`data.device_decode`, with `data.device_aug`): workers check headers and
ship the bytes packed in one tensor, the device decodes them (nvJPEG on CUDA) into `CheapView`'s squares."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor

try:  # torchvision 0.29 deprecated its image codecs in favour of TorchCodec; a later release removes them
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:
    decode_jpeg = None

from ssl_vit.data.device.augment import CheapView
from ssl_vit.data.samples import SKIP_REASONS, open_image

log = logging.getLogger(__name__)

_DEVICE_MODES = ("RGB", "L")  # what decode_jpeg(mode=RGB) turns into RGB on every backend; CMYK stays on the CPU
_CORRUPT = SKIP_REASONS.index("corrupt_image")


def torchvision_decodes_jpeg() -> bool:
    """Whether this torchvision still has `decode_jpeg` (else PIL decodes, and `data.device_decode` is refused)."""
    return decode_jpeg is not None


def jpeg_payload(sample: dict, max_image_pixels: int) -> bytes | None:
    """The bytes of `sample`'s JPEG when its header says the device can decode it, else None: the CPU path keeps
    handling, and counting, everything unusual."""
    data = sample.get("jpg", sample.get("jpeg"))
    if not isinstance(data, (bytes, bytearray, memoryview)) or "png" in sample or "webp" in sample:
        return None
    try:
        head = open_image(data, max_image_pixels)
    except Exception:  # not a readable header, or too large: the CPU path names the reason
        return None
    return bytes(data) if head.format in ("JPEG", "MPO") and head.mode in _DEVICE_MODES else None  # MPO: a JPEG


def decode_on_host(payload: bytes) -> Tensor | None:
    """A `jpeg_payload` decoded here by torchvision (PIL's pixels, less CPU): uint8 (3, H, W), or None (the PIL
    path then decides, and counts, what is wrong)."""
    if decode_jpeg is None:
        return None
    # a writable copy: frombuffer warns on read-only bytes
    return _decode_jpeg(torch.frombuffer(bytearray(payload), dtype=torch.uint8), torch.device("cpu"))


def _decode_jpeg(data: Tensor | list[Tensor], device: torch.device, warn: bool = False) -> Any:
    """torchvision's decode_jpeg to RGB on `device`; None where the data does not decode (out of memory raises)."""
    try:
        with warnings.catch_warnings():
            # torchvision ≥ 0.29 warns on every call that its codecs move to TorchCodec: known, see the import
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as err:
        if "out of memory" in str(err).lower():
            raise
        if warn:
            log.warning("a JPEG failed to decode on %s; counted as corrupt_image: %s", device, err)
        return None


def pack_payloads(payloads: list[bytes | None]) -> tuple[Tensor, Tensor]:
    """Per-sample payloads (None: decoded on the CPU) → (flat uint8 tensor, LongTensor of sizes, 0 for None)."""
    flat = bytearray().join(p for p in payloads if p is not None)  # one copy; a bytearray is writable
    data = torch.frombuffer(flat, dtype=torch.uint8) if flat else torch.empty(0, dtype=torch.uint8)
    return data, torch.tensor([0 if p is None else len(p) for p in payloads], dtype=torch.long)


def unpack_payloads(data: Tensor, sizes: Tensor) -> list[Tensor | None]:
    """Inverse of `pack_payloads`: a uint8 (N,) view per sample, None where the size is 0."""
    counts = sizes.tolist()  # one read, not a tensor comparison and an int() per sample
    return [part if n > 0 else None for part, n in zip(torch.split(data, counts), counts, strict=True)]


class DeviceDecoder:
    """A host-side loader batch of `data.device_decode` → the batch with one uint8 (B, 3, size, size) "image" on
    `device`; None when no image decodes (its skip counts then ride on the next batch)."""

    def __init__(self, size: int, device: torch.device) -> None:
        self.size, self.device, self.square = size, device, CheapView(size)
        self._carry: Tensor | int = 0  # skip counts of batches returned as None

    def _decode(self, payloads: list[Tensor]) -> list[Tensor | None]:
        if not payloads:
            return []
        if self.device.type == "cuda":
            # nvJPEG writes from a stream of its own without waiting for ours, into memory the caching allocator
            # may just have recycled while queued kernels still read it
            torch.cuda.current_stream(self.device).synchronize()
        # one batched call (nvJPEG decodes the whole list at once), else one by one to find the broken ones
        decoded = _decode_jpeg(payloads, self.device)
        if decoded is not None:
            return list(decoded)
        return [_decode_jpeg(data, self.device, warn=True) for data in payloads]

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any] | None:
        batch = dict(batch)
        payloads = unpack_payloads(batch.pop("jpeg"), batch.pop("jpeg_sizes"))
        on_host = iter(batch["image"])  # the squares the worker decoded itself, in batch order
        decoded = iter(self._decode([p for p in payloads if p is not None]))
        images = [next(on_host) if p is None else next(decoded) for p in payloads]
        skipped = batch["skipped"].clone()
        skipped[0] += self._carry
        self._carry = 0
        keep = [i for i, image in enumerate(images) if image is not None]
        skipped[0, _CORRUPT] += len(images) - len(keep)
        if not keep:
            self._carry = skipped.sum(dim=0)
            return None
        # a failed row takes a copy of a good one (cycling through them): the batch keeps its shape
        refill = iter(keep * len(images))
        rows = [i if images[i] is not None else next(refill) for i in range(len(images))]
        squares = {i: images[i] if payloads[i] is None else self.square(images[i]) for i in keep}
        image = torch.stack([squares[i].to(self.device, non_blocking=True) for i in rows])
        # "refilled": rows that are copies, not images of their own (the monitor does not count them as images)
        out = {**batch, "skipped": skipped, "image": image, "refilled": len(images) - len(keep)}
        for key in ("label", "key"):
            if key in batch:
                out[key] = batch[key][rows] if isinstance(batch[key], Tensor) else [batch[key][i] for i in rows]
        return out


def decoded_batches(stream: Iterable[dict[str, Any]], size: int, device: torch.device) -> Iterator[dict[str, Any]]:
    """A `data.device_decode` loader stream with its JPEGs decoded on `device` (see `DeviceDecoder`)."""
    decoder = DeviceDecoder(size, device)
    return (batch for batch in map(decoder, stream) if batch is not None)
