"""Loader side of the benchmark: the loader's images/s against what its workers could do at one core each.

Every rate is the best of `rounds` timed rounds, as `timeit` advises: on a shared machine other work only ever
slows a round down, so the fastest one is the closest to what the code itself costs.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from itertools import islice
from typing import Any

import webdataset as wds
from PIL import Image

from ssl_vit.config import DataConfig
from ssl_vit.data.batch_pool import released_after_use
from ssl_vit.data.samples import SampleError
from ssl_vit.data.shards import DecodeStage, SkipCounter, resolve_shards, train_stream


def single_core_rate(cfg: DataConfig, views: Callable[[Image.Image], Any], samples: int = 300,
                     rounds: int = 1) -> float:
    """Images/s of decode + `views` in this process (one core), best of `rounds` passes over `samples`
    samples held in memory: the ceiling of one loader worker."""
    urls = resolve_shards(cfg.train, cfg.allow_pipe)
    raw = []
    while len(raw) < samples:  # a small demo set is cycled until `samples` are held in memory
        before = len(raw)
        raw += list(islice(wds.tarfile_to_samples()(dict(url=u) for u in urls), samples - len(raw)))
        if len(raw) == before:
            raise ValueError(f"no samples in {cfg.train!r}")
    # The worker's own per-sample step: decode + views, or only a header check for device-decoded JPEGs.
    convert = DecodeStage(SkipCounter(), views, cfg.max_image_pixels, with_label=False,
                      pass_jpeg=cfg.device_decode).convert
    best = 0.0
    for _ in range(rounds):
        done, t0 = 0, time.perf_counter()
        for sample in raw:  # reading the tar happens above: only decode + augmentation are timed
            try:
                convert(sample)
            except SampleError:
                continue
            done += 1
        best = max(best, done / (time.perf_counter() - t0))
    return best


def warmup_batches(cfg: DataConfig) -> int:
    """Batches until every worker's shuffle buffer is full. While it fills, a worker reads two samples per one
    it yields (webdataset's shuffle) and its memory grows: a start-up phase, not the rate training runs at."""
    if cfg.shuffle_buffer <= 1:
        return 0
    return math.ceil(max(cfg.num_workers, 1) * cfg.shuffle_buffer / cfg.batch_size)


def loader_rate(cfg: DataConfig, views: Callable[[Image.Image], Any], batches: int, seed: int = 0,
                rounds: int = 1) -> float:
    """Images/s of the training stream alone (no model), as the trainer reads it (pooled shared memory released
    after use), once the workers have started and their shuffle buffers are full (`warmup_batches`): the best
    of `rounds` consecutive windows of `batches` batches."""
    stream = released_after_use(iter(train_stream(cfg, views, rank=0, world_size=1, seed=seed, reuse_memory=True)))
    for _ in range(1 + warmup_batches(cfg)):
        next(stream)
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(batches):
            next(stream)
        best = max(best, batches * cfg.batch_size / (time.perf_counter() - t0))
    del stream  # stops the workers
    return best


def loader_report(cfg: DataConfig, views: Callable[[Image.Image], Any], batches: int,
                  samples: int = 300, rounds: int = 3) -> dict[str, float | int]:
    """Loader images/s next to workers × single-core decode+augment rate (the issue's ≥ 0.9 target), and next
    to workers × the whole stream run in this process (tar reading, shuffle, decode, views, collation: all a
    worker does), which separates a worker's own overhead from the cost of running workers in parallel."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    core = single_core_rate(cfg, views, samples, rounds)
    pipeline = loader_rate(dataclasses.replace(cfg, num_workers=0), views, batches, rounds=rounds)
    loader = loader_rate(cfg, views, batches, rounds=rounds)
    workers = max(cfg.num_workers, 1)  # num_workers=0 decodes in the main process: one core
    return {
        "loader_images_per_s": loader,
        "single_core_images_per_s": core,
        "pipeline_single_core_images_per_s": pipeline,
        "num_workers": cfg.num_workers,
        "loader_warmup_batches": warmup_batches(cfg),
        "loader_rounds": rounds,
        "loader_vs_workers_x_single_core": loader / (workers * core),
        "loader_vs_workers_x_pipeline": loader / (workers * pipeline),
    }
