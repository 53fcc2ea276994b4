"""The pretraining stream as the trainer reads it: on CUDA copied one batch ahead, or device-decoded."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate.utils import recursively_apply, send_to_device
from PIL import Image
from tqdm import tqdm

from ssl_vit.config.pretrain import DataConfig
from ssl_vit.data.device.augment import cheap_size
from ssl_vit.data.device.decode import decoded_batches
from ssl_vit.data.shards import train_stream


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor in `batch` (nested dicts, lists, tuples) moved to `device` without blocking the host."""
    return send_to_device(batch, device, non_blocking=True)


class DevicePrefetcher:
    """Batches copied to a CUDA device one ahead on a side stream, overlapping the step (as timm's PrefetchLoader)."""

    def __init__(self, stream: Iterator[dict[str, Any]], device: torch.device) -> None:
        self.stream, self.device = stream, device
        self.copy_stream = torch.cuda.Stream(device)
        self.ahead: dict[str, Any] | None = None

    def __iter__(self) -> DevicePrefetcher:
        return self

    def _copy_next(self) -> dict[str, Any]:
        batch = next(self.stream)
        with torch.cuda.stream(self.copy_stream):
            return to_device(batch, self.device)

    def __next__(self) -> dict[str, Any]:
        batch = self.ahead if self.ahead is not None else self._copy_next()  # StopIteration at the end
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.copy_stream)  # the step's kernels start once its copy is done
        # allocated on the copy stream, used on this one: its memory must not go to the next copy while in use
        recursively_apply(lambda t: t.record_stream(current), batch)
        try:
            self.ahead = self._copy_next()  # the next copy runs while this batch trains
        except StopIteration:  # a finite stream: this was its last batch
            self.ahead = None
        return batch


def training_batches(cfg: DataConfig, views: Callable[[Image.Image], Any], device: torch.device, *, img_size: int,
                     rank: int, world_size: int, seed: int, start_step: int = 0, skip: int = 0,
                     progress: bool = False) -> Iterator[dict[str, Any]]:
    """Endless pretraining batches, on CUDA already on the device; the first `skip` are dropped before any is
    decoded or copied there (a resume fast-forwarding)."""
    stream = iter(train_stream(cfg, views, rank=rank, world_size=world_size, seed=seed, start_step=start_step))
    for _ in tqdm(range(skip), desc="fast-forwarding data", disable=not progress or not skip):
        next(stream)
    if cfg.device_decode:
        # decoding here counts as data wait; the decoder synchronises the training stream itself (no side stream)
        return decoded_batches(stream, cheap_size(img_size), device)
    return DevicePrefetcher(stream, device) if device.type == "cuda" else stream
