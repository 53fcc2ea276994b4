"""The pretraining stream as the trainer (and the benchmark) reads it: `train_stream`, copied to a CUDA device
one batch ahead, or with `data.device_decode` its JPEGs decoded on the training device."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from ssl_vit.config.pretrain import DataConfig
from ssl_vit.data.device.augment import cheap_size
from ssl_vit.data.device.decode import decoded_batches
from ssl_vit.data.shards import train_stream


def to_device(batch: Any, device: torch.device) -> Any:
    """Every tensor in `batch` (nested dicts, lists, tuples) moved to `device`, without blocking the host
    (pinned memory on CUDA); anything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, dict):
        for value in batch.values():
            yield from _tensors(value)
    elif isinstance(batch, (list, tuple)):
        for value in batch:
            yield from _tensors(value)


class DevicePrefetcher:
    """Batches copied to a CUDA device one batch ahead, on a side stream. On the training stream the copy of the
    next batch would queue between two steps' kernels; on its own stream it overlaps the current step, as in
    timm's PrefetchLoader. The batch handed out is made to wait for its copy on the GPU, not on the host."""

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
        for tensor in _tensors(batch):
            # allocated on the copy stream, used on this one: the allocator must not hand its memory to the next
            # copy while this step's kernels may still read it
            tensor.record_stream(current)
        try:
            self.ahead = self._copy_next()  # the next copy runs while this batch trains
        except StopIteration:  # a finite stream: this was its last batch
            self.ahead = None
        return batch


def training_batches(cfg: DataConfig, views: Callable[[Image.Image], Any], device: torch.device, *, img_size: int,
                     rank: int, world_size: int, seed: int, start_step: int = 0, skip: int = 0,
                     progress: bool = False) -> Iterator[dict[str, Any]]:
    """Endless pretraining batches: on CUDA already on the device (copied one batch ahead by `DevicePrefetcher`;
    device-decoded ones are decoded there), elsewhere on the CPU. The first `skip` batches are read and dropped
    before any is decoded on or copied to the device (a resume fast-forwarding to where it stopped; `progress`:
    with a progress bar)."""
    stream = iter(train_stream(cfg, views, rank=rank, world_size=world_size, seed=seed, start_step=start_step))
    for _ in tqdm(range(skip), desc="fast-forwarding data", disable=not progress or not skip):
        next(stream)
    if cfg.device_decode:
        # The loader ships JPEG bytes; decoding them here counts as data wait (it is data preparation). The
        # decoder synchronises the training stream itself (see DeviceDecoder), so no side-stream copies here.
        return decoded_batches(stream, cheap_size(img_size), device)
    return DevicePrefetcher(stream, device) if device.type == "cuda" else stream
