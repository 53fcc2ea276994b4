"""The pretraining stream as the trainer (and the benchmark) reads it: `train_stream`, pooled shared memory
released after use, and JPEGs decoded on the training device with `data.device_decode`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from PIL import Image

from ssl_vit.config import DataConfig
from ssl_vit.data.batch_pool import released_after_use
from ssl_vit.data.device_aug import cheap_size
from ssl_vit.data.device_decode import decoded_batches
from ssl_vit.data.shards import train_stream


def reuses_memory(device: torch.device) -> bool:
    """Whether a batch's pooled shared memory may be released once the next batch is read: on CPU the step is
    synchronous; on CUDA the pin-memory thread has copied the batch out of the pool before the step sees it.
    Elsewhere a non-blocking copy could still be reading the pool, so batches keep fresh memory."""
    return device.type in ("cpu", "cuda")


def training_batches(cfg: DataConfig, views: Callable[[Image.Image], Any], device: torch.device, *, img_size: int,
                     rank: int, world_size: int, seed: int, start_step: int = 0) -> Iterator[dict[str, Any]]:
    """Endless pretraining batches on the CPU (device-decoded ones on `device`); each batch's CPU tensors are
    valid until the next batch is asked for."""
    reuse = reuses_memory(device)
    stream: Iterator[dict[str, Any]] = iter(train_stream(cfg, views, rank=rank, world_size=world_size, seed=seed,
                                                         start_step=start_step, reuse_memory=reuse))
    if reuse:
        stream = released_after_use(stream)
    if cfg.device_decode:
        # The loader ships JPEG bytes; decoding them here counts as data wait (it is data preparation).
        stream = decoded_batches(stream, cheap_size(img_size), device)
    return stream
