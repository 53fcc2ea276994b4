"""WebDataset train and eval loaders: safe decoding, bad samples skipped and counted per reason, batches collated,
stop signals left to the main process (docs/data.md)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from ssl_vit.config.pretrain import DataConfig
from ssl_vit.data.device.decode import decode_on_host, jpeg_payload, pack_payloads, torchvision_decodes_jpeg
from ssl_vit.data.samples import SampleError, decode_sample, read_label
from ssl_vit.data.shard_urls import resolve_shards
from ssl_vit.data.tar_samples import SkipCounter, TarSamples

log = logging.getLogger(__name__)

_MAX_FRUITLESS = 10_000  # consecutive failures without one good sample before the train stream gives up
# what a sample torn by its shard's break lacks for that reason alone; faults of the members it has still count
_TEAR = ("read_error", "no_image")


def _seeded_shuffle(src: Iterable[dict], bufsize: int, seed_fn: Callable[[], int]) -> Iterator[dict]:
    """wds.shuffle seeded inside the worker (a main-process rng would be copied into every worker alike)."""
    return wds.shuffle(bufsize, initial=min(bufsize, 100), seed=seed_fn())(src)


class DecodeStage:
    """Raw samples → {"image", "skipped"[, "label", "key"][, "jpeg"]}, each held back until the next good one so
    that skips after a worker's last good sample are still reported. `pass_jpeg` (data.device_decode): JPEGs the
    device decodes leave as bytes ("jpeg", "image" None); `lone_skips` (finite streams): a stream with no good
    sample sends its skip counts on an image-less sample at its end."""

    def __init__(self, counter: SkipCounter, transform: Callable, max_pixels: int, with_label: bool,
                 pass_jpeg: bool = False, lone_skips: bool = False) -> None:
        self.counter, self.transform, self.lone_skips = counter, transform, lone_skips
        self.max_pixels, self.with_label, self.pass_jpeg = max_pixels, with_label, pass_jpeg
        self.to_tensor = not pass_jpeg and getattr(transform, "takes_tensors", False) and torchvision_decodes_jpeg()

    def convert(self, sample: dict) -> dict[str, Any]:
        label = read_label(sample.get("cls")) if self.with_label else None  # first: bad_label wins over the image
        if label is None and self.with_label and sample.get("__cut__"):  # its cls may have been cut off
            raise SampleError("read_error", "the shard broke off after its image")
        payload = jpeg_payload(sample, self.max_pixels) if self.pass_jpeg or self.to_tensor else None
        if payload is not None and self.pass_jpeg:
            out: dict[str, Any] = {"image": None, "jpeg": payload}
        else:
            img = decode_on_host(payload) if payload is not None else None
            if img is None:
                img = decode_sample(sample, self.max_pixels)
            out = {"image": self.transform(img), **({"jpeg": None} if self.pass_jpeg else {})}
        if self.with_label:
            out["label"] = -1 if label is None else label
            out["key"] = sample["__key__"]
        return out

    def __call__(self, src: Iterable[dict]) -> Iterator[dict]:
        held = None
        for sample in src:
            try:
                out = self.convert(sample)
            except SampleError as err:
                log.debug("skipping sample %s: %s", sample.get("__key__"), err)
                if sample.get("__cut__") and err.reason in _TEAR:  # counted as the shard's read_error already
                    self.counter.no_progress(sample.get("__url__"))
                else:
                    self.counter.add(err.reason, sample.get("__url__"))
                continue
            if held is not None:
                yield {**held, "skipped": self.counter.take()}
            held = out
        if held is None and self.lone_skips and any(self.counter.pending):
            held = {"image": None, "label": -1, "key": None}  # a lone skip-count sample
        if held is not None:
            yield {**held, "skipped": self.counter.take()}


def _stream_seed(seed: int, rank: int, start_step: int, salt: int) -> int:
    """Seed from (seed, rank, loader worker, start_step, salt); evaluated inside the worker process."""
    info = torch.utils.data.get_worker_info()
    worker = info.id + 1 if info is not None else 0
    entropy = [seed & 0xFFFFFFFFFFFFFFFF, rank, worker, start_step, salt]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def share_of_shards(urls: Sequence[str], index: int, count: int) -> list[str]:
    """The shards participant `index` of `count` (a rank, or a rank's loader worker) reads: dealt round-robin, or
    all of them with fewer shards than participants (a resampled stream still differs through its seed)."""
    return list(urls[index::count]) if len(urls) >= count else list(urls)


class _ResampledShares:
    """Endless shard draws (with replacement) from this worker's share of this rank's share, so that all ranks run
    the same number of steps whatever their shard counts (a class: tests/inject_fault.py wraps its `__call__`)."""

    def __init__(self, urls: list[str], rank: int, world_size: int, seed_fn: Callable[[], int]) -> None:
        self.urls, self.rank, self.world_size, self.seed_fn = urls, rank, world_size, seed_fn

    def __call__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        shares = share_of_shards(share_of_shards(self.urls, self.rank, self.world_size), worker, workers)
        rng = np.random.default_rng(self.seed_fn())
        while True:
            yield dict(url=shares[int(rng.integers(len(shares)))])


def _shard_dicts(urls: list[str]) -> Iterator[dict]:
    """This loader worker's shards, dealt round-robin (not by `wds.split_by_worker`: docs/data.md says why)."""
    info = torch.utils.data.get_worker_info()
    mine = urls if info is None else urls[info.id::info.num_workers]
    return (dict(url=u) for u in mine)


def collate(samples: list[dict]) -> dict[str, Any]:
    """`default_collate` of the samples, skip counts as one LongTensor (B, reasons); JPEG payloads packed into
    one "jpeg" tensor (`pack_payloads`); a lone skip-count sample makes a batch of no images and no keys."""
    skipped = torch.tensor([s["skipped"] for s in samples], dtype=torch.long)
    first = samples[0]
    if first["image"] is None and first.get("key", "") is None:  # lone skip counts
        return {"image": torch.empty(0), "skipped": skipped, "label": torch.empty(0, dtype=torch.long), "key": []}
    batch = default_collate([{k: v for k, v in s.items() if k not in ("image", "jpeg", "skipped")} for s in samples])
    batch["skipped"] = skipped
    decoded = [s["image"] for s in samples if s["image"] is not None]  # None: a JPEG left for the device
    batch["image"] = default_collate(decoded) if decoded else torch.empty(0, dtype=torch.uint8)
    if "jpeg" in first:
        batch["jpeg"], batch["jpeg_sizes"] = pack_payloads([s["jpeg"] for s in samples])
    return batch


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """A loader worker's `worker_init_fn`: SIGINT ignored, SIGTERM obeyed only from the parent (docs/data.md)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    # blocked before any thread starts (they inherit the mask): only the thread below accepts it, and sees who sent it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_end_on_the_parents_sigterm, args=(os.getppid(),), daemon=True,
                     name="sigterm-from-parent").start()


def _end_on_the_parents_sigterm(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)  # what torch's own worker handler does on its parent's SIGTERM


def train_stream(cfg: DataConfig, views: Callable[[Image.Image], Any], *, rank: int, world_size: int,
                 seed: int, start_step: int = 0, with_label: bool = False) -> DataLoader:
    """Endless pretraining batches {"image": Tensor(B,3,H,W) or list of them, "skipped": LongTensor(B, n)}, plus
    "label" (-1 if none) and "key" with `with_label`; reproducible for a given (seed, rank, start_step)."""
    urls = resolve_shards(cfg.train, cfg.allow_pipe)
    counter = SkipCounter(give_up_after=_MAX_FRUITLESS)
    shard_seed = partial(_stream_seed, seed, rank, start_step, 0)
    pipeline = wds.DataPipeline(
        _ResampledShares(urls, rank, world_size, shard_seed),
        TarSamples(counter),
        partial(_seeded_shuffle, bufsize=cfg.shuffle_buffer, seed_fn=partial(_stream_seed, seed, rank, start_step, 1))
        if cfg.shuffle_buffer > 1 else None,
        DecodeStage(counter, views, cfg.max_image_pixels, with_label=with_label, pass_jpeg=cfg.device_decode),
    )
    # seeds the workers' torch/numpy/random state (augmentations); with 0 workers they use the global torch RNG
    generator = torch.Generator().manual_seed(_stream_seed(seed, rank, start_step, 2))
    return DataLoader(pipeline, batch_size=cfg.batch_size, drop_last=True,
                      collate_fn=collate, num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0,
                      pin_memory=torch.cuda.is_available(), generator=generator,
                      worker_init_fn=leave_stop_signals_to_the_main_process)


def eval_stream(shards: str | Sequence[str], transform: Callable[[Image.Image], torch.Tensor], *,
                batch_size: int, num_workers: int, rank: int, world_size: int, allow_pipe: bool = False,
                max_image_pixels: int = DataConfig.max_image_pixels) -> DataLoader:
    """One pass, every sample read once across ranks (shard i → rank i % world_size) and workers:
    {"image", "label" (-1 if none), "key": list[str], "skipped": LongTensor(B, n)}, exact skip counts."""
    urls = resolve_shards(shards, allow_pipe)
    counter = SkipCounter()
    pipeline = wds.DataPipeline(
        partial(_shard_dicts, urls[rank::world_size]),  # not a list: DataPipeline splices lists in
        TarSamples(counter),
        DecodeStage(counter, transform, max_pixels=max_image_pixels, with_label=True, lone_skips=True),
    )
    return DataLoader(pipeline, batch_size=batch_size, drop_last=False, collate_fn=collate,
                      num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                      worker_init_fn=leave_stop_signals_to_the_main_process)
