"""Samples → one batch: image stacks (a list of them for multi-crop views), labels, keys and skip counts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import default_collate, get_worker_info

from ssl_vit.data.batch_pool import DEFAULT_SLOTS, BatchPool, PooledBatch, stack_new
from ssl_vit.data.device.decode import pack_payloads


def _stack_groups(groups: Sequence[list[Tensor]], pool: BatchPool | None, batch: dict[str, Any]) -> list[Tensor]:
    if pool is not None and all(_plain_cpu_tensors(group) for group in groups):
        pooled = pool.stack(groups)
        if pooled is not None:
            stacks, batch["lease"] = pooled
            return stacks
    return [stack_new(group) if _plain_cpu_tensors(group) else default_collate(group) for group in groups]


def _plain_cpu_tensors(group: Sequence[Any]) -> bool:
    """What `stack_new` takes: CPU tensors of one dtype, outside autograd. Anything else a caller's own transform
    may return (numbers, arrays, tensors on a device or with grad) goes to default_collate, as it always did."""
    first = group[0]
    return isinstance(first, Tensor) and all(
        isinstance(t, Tensor) and t.device.type == "cpu" and not t.requires_grad and t.dtype == first.dtype
        for t in group)


def collate(samples: list[dict], pool: BatchPool | None = None) -> dict[str, Any]:
    """Stack images (a list of stacks for multi-crop views), labels and skip counts; keys stay a list.

    With JPEG pass-through, "image" stacks only the samples decoded here (in batch order) and the JPEG payloads
    are packed into one "jpeg" tensor with per-sample "jpeg_sizes", 0 for the others (see `pack_payloads`): two
    shared-memory blocks a batch, not one per image. With a `pool` the image stacks go into its reusable
    buffers when a slot is free, and the batch carries the slot's "lease" (see `batch_pool`). The skip counts
    of a stream with no usable sample (`DecodeStage`'s lone_skips) make a batch of no images and no keys.
    """
    batch: dict[str, Any] = {}
    first = samples[0]["image"]
    if first is None and samples[0].get("key", "") is None:  # lone skip counts
        return {"image": torch.empty(0), "skipped": torch.tensor([s["skipped"] for s in samples], dtype=torch.long),
                "label": torch.empty(0, dtype=torch.long), "key": []}
    if "jpeg" in samples[0]:  # its stacks vary in length from batch to batch: never pooled
        decoded = [s["image"] for s in samples if s["image"] is not None]
        images: Any = stack_new(decoded) if decoded else torch.empty(0, dtype=torch.uint8)
    elif isinstance(first, (list, tuple)):
        images = _stack_groups([[s["image"][i] for s in samples] for i in range(len(first))], pool, batch)
    else:
        images = _stack_groups([[s["image"] for s in samples]], pool, batch)[0]
    batch["image"] = images
    batch["skipped"] = torch.tensor([s["skipped"] for s in samples], dtype=torch.long)
    if "jpeg" in samples[0]:
        batch["jpeg"], batch["jpeg_sizes"] = pack_payloads([s["jpeg"] for s in samples])
    if "label" in samples[0]:
        batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
        batch["key"] = [s["key"] for s in samples]
    return batch


class PooledCollate:
    """`collate` for a DataLoader whose loader workers each stack into their own `BatchPool` (made on first
    use inside the worker, after the fork) and hand pooled batches over as `PooledBatch`; in the main process
    (num_workers=0) nothing is shared, so plain."""

    def __init__(self, slots: int = DEFAULT_SLOTS) -> None:
        self.slots = slots
        self.pool: BatchPool | None = None

    def __call__(self, samples: list[dict]) -> dict[str, Any] | PooledBatch:
        if get_worker_info() is None:
            return collate(samples)
        if self.pool is None:
            self.pool = BatchPool(self.slots)
        batch = collate(samples, self.pool)
        # a pooled batch crosses to the main process without its buffers once they are there (see PooledBatch)
        return PooledBatch(batch, self.pool) if "lease" in batch else batch
