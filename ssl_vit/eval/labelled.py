"""Labelled shards for supervised training on top of a backbone (augmented linear probe, fine-tuning)."""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from PIL import Image

from ssl_vit.config import DataConfig
from ssl_vit.data.batch_pool import released_after_use
from ssl_vit.data.batches import reuses_memory
from ssl_vit.data.samples import IMAGE_EXTS
from ssl_vit.data.shard_urls import resolve_shards
from ssl_vit.data.shards import train_stream

_SEED_OFFSET = 1000  # streams of their own, never equal to a pretraining stream with the same seed


def labelled_train_stream(shards: str, transform: Callable[[Image.Image], torch.Tensor], *, batch_size: int,
                          num_workers: int, shuffle_buffer: int, rank: int, world_size: int, seed: int,
                          allow_pipe: bool = False, max_image_pixels: int = DataConfig.max_image_pixels,
                          device: torch.device | None = None) -> Iterator[dict]:
    """Endless shuffled batches {"image", "label" (-1 if none), "key", "skipped"}, full batches only: the
    pretraining stream (shards dealt to ranks and workers, resampled, seeded shuffle, safe decoding) with the
    labels kept. With the training `device`, workers reuse their batch memory where that is safe there
    (`reuses_memory`): a batch's CPU tensors are then valid until the next batch is asked for."""
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be ≥ 0, got {shuffle_buffer}")
    cfg = DataConfig(train=shards, batch_size=batch_size, num_workers=num_workers, shuffle_buffer=shuffle_buffer,
                     max_image_pixels=max_image_pixels, allow_pipe=allow_pipe)
    reuse = device is not None and reuses_memory(device)
    stream = iter(train_stream(cfg, transform, rank=rank, world_size=world_size, seed=seed + _SEED_OFFSET,
                               with_label=True, reuse_memory=reuse))
    return released_after_use(stream) if reuse else stream


def count_samples(shards: str | Sequence[str], allow_pipe: bool = False) -> int:
    """Samples with an image member in local tar shards, from the tar headers alone (no image is read)."""
    total = 0
    for url in resolve_shards(shards, allow_pipe):
        path = Path(url.removeprefix("file:"))
        if not path.is_file():
            raise ValueError(f"cannot count the samples of remote shard {url}; give the train-set size explicitly")
        keys = set()
        with tarfile.open(path) as tar:  # seeks past member data: reads headers only
            for member in tar:
                # webdataset's grouping: key = path up to the first dot of the file name, extension = the rest
                folder, _, name = member.name.rpartition("/")
                stem, dot, ext = name.partition(".")
                if member.isfile() and dot and ext.lower() in IMAGE_EXTS:
                    keys.add(f"{folder}/{stem}")
        total += len(keys)
    return total


def classes_file_count(shards: str | Sequence[str], allow_pipe: bool = False) -> int | None:
    """Number of classes in the `classes.txt` that `make-shards` writes beside the shards; None if absent."""
    first = Path(resolve_shards(shards, allow_pipe)[0].removeprefix("file:"))
    listing = first.parent / "classes.txt"
    if not listing.is_file():
        return None
    return sum(1 for line in listing.read_text().splitlines() if line.strip())
