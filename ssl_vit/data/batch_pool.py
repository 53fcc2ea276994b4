"""Reusable shared-memory batches for loader workers (`train_stream(..., reuse_memory=True)`).

A DataLoader worker normally stacks every batch into fresh shared memory, and the kernel allocates and zeroes
each of its pages on first touch: about 5 ms per 32 uint8 images at 224 px on a 2-core test machine, a
measurable share of a cheap-view worker's time (docs/benchmarks.md). Here each worker keeps a few batch
buffers in shared memory and stacks into one that the consumer has handed back:

    worker:    stack into a free slot, flags[slot] = 1, batch["lease"] = BatchLease(flags, slot)
    consumer:  trains on the batch, then lease.release(), which sets flags[slot] = 0

A slot is written again only after its release. A consumer that never releases, or keeps its batches, still
gets correct data: once every slot is taken, batches go into fresh shared memory as before.
`released_after_use` releases each batch when the next one is asked for, which fits a training loop.

Handing a tensor from a worker to the main process passes a file descriptor through a socket handshake: about
0.2 ms of CPU on each side, per tensor and batch (docs/benchmarks.md). A pooled batch therefore travels as a
`PooledBatch`: a slot's tensors (and the flags) cross once, the consumer's process keeps them under the pool's
name (`_RECEIVED`), and later batches in that slot name the slot only; labels and skip counts travel as numbers.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import get_worker_info

# Slots a worker needs when its consumer releases on the next request: the batch the consumer holds, the
# DataLoader's prefetched ones (prefetch_factor, 2 by default) and one in the making. One more is slack.
DEFAULT_SLOTS = 4


class BatchLease:
    """The consumer's handle on one pooled batch's shared memory; `release()` lets the worker reuse it.

    The flag tensor lives in shared memory, so it crosses to the consumer's process with the batch and the
    write in `release` is seen by the worker."""

    def __init__(self, flags: Tensor, slot: int, pool: str = "", generation: int = 0) -> None:
        # pool: the pool's name; generation: which buffers of the slot (a slot remade for new shapes counts up)
        self.flags, self.slot, self.pool, self.generation = flags, slot, pool, generation

    def release(self) -> None:
        self.flags[self.slot] = 0


class BatchPool:
    """One loader worker's shared-memory batch buffers: `slots` batches, each a list of stacks (one per crop
    resolution for multi-crop views). Made inside the worker process."""

    def __init__(self, slots: int = DEFAULT_SLOTS) -> None:
        if slots < 1:
            raise ValueError(f"a batch pool needs at least one slot, got {slots}")
        self.name = secrets.token_hex(8)  # unique across workers and loaders: the consumer's cache key
        self.flags = torch.zeros(slots, dtype=torch.uint8).share_memory_()  # 1: handed out, not yet released
        self.layouts: list[list[Layout]] = []  # per slot: what its buffers were made for
        self.buffers: list[list[Tensor]] = []
        self.generations: list[int] = []  # per slot: counts up each time its buffers are remade
        self.sent: set[tuple[int, int]] = set()  # (slot, generation) whose buffers went to the consumer

    def stack(self, groups: Sequence[Sequence[Tensor]]) -> tuple[list[Tensor], BatchLease] | None:
        """Each group of equally shaped tensors stacked into a free slot's shared buffers, with the lease that
        frees the slot again; None when every slot is still held (the caller then stacks as usual)."""
        layout = [_layout(group) for group in groups]
        taken = self.flags.tolist()
        slot = next((i for i, flag in enumerate(taken) if not flag), None)
        if slot is None:
            return None
        if slot == len(self.buffers):
            self.layouts.append([])
            self.buffers.append([])
            self.generations.append(-1)
        if self.layouts[slot] != layout:  # a new slot, or new shapes
            self.layouts[slot], self.buffers[slot] = layout, [_empty(*spec) for spec in layout]
            self.generations[slot] += 1
        stacks = [_stack_into(group, buffer, channels_last)
                  for group, buffer, (_, _, channels_last) in zip(groups, self.buffers[slot], layout, strict=True)]
        self.flags[slot] = 1
        return stacks, BatchLease(self.flags, slot, self.name, self.generations[slot])


# A PIL image becomes a (C, H, W) view of (H, W, C) memory. Stacking such views into (B, C, H, W) memory is a
# transpose, about 1.3 ms for 32 images at 224 px; into (B, H, W, C) memory it is a plain copy (0.13 ms). The
# batch is then a channels-last (B, C, H, W) tensor; `transforms.normalize` and device augmentation lay it out
# contiguously in their conversion to float, a full pass over the batch anyway (the model is faster on that).
Layout = tuple[tuple[int, ...], torch.dtype, bool]  # batch shape (B, C, H, W …), dtype, channels last


def _layout(group: Sequence[Tensor]) -> Layout:
    first = group[0]
    # channels innermost in memory: a PIL view, and crops of one (device augmentation's square is cut from a
    # resized (H, W', C) image, so its rows are W' apart: not contiguous, yet each row copies in one piece)
    channels_last = first.dim() == 3 and first.stride(0) < first.stride(2)
    return (len(group), *first.shape), first.dtype, channels_last


def _empty(shape: tuple[int, ...], dtype: torch.dtype, channels_last: bool, shared: bool = True) -> Tensor:
    dims = (shape[0], *shape[2:], shape[1]) if channels_last else shape  # channels last: (B, H, W, C) memory
    if shared:  # allocated in shared memory: share_memory_() would fill ordinary memory, then copy it over
        storage = torch.UntypedStorage._new_shared(math.prod(dims) * dtype.itemsize)
        memory = torch.empty(0, dtype=dtype).set_(storage, 0, dims)
    else:
        memory = torch.empty(dims, dtype=dtype)
    return memory.permute(0, 3, 1, 2) if channels_last else memory


def _stack_into(group: Sequence[Tensor], buffer: Tensor, channels_last: bool) -> Tensor:
    if channels_last:  # stack the (H, W, C) views into the buffer's (B, H, W, C) memory
        torch.stack([t.permute(1, 2, 0) for t in group], out=buffer.permute(0, 2, 3, 1))
        return buffer
    return torch.stack(list(group), out=buffer)


def stack_new(group: Sequence[Tensor]) -> Tensor:
    """`group` stacked into new memory, channels-last where its tensors are (see `Layout`): shared memory inside
    a loader worker, so that the batch crosses to the consumer without another copy (as default_collate does),
    ordinary memory in the main process. For batches a pool does not take: its slots all held, num_workers=0,
    or device-decode batches, whose length varies."""
    layout = _layout(group)
    buffer = _empty(*layout, shared=get_worker_info() is not None)
    return _stack_into(group, buffer, layout[2])


def released_after_use(stream: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The batches of `stream` without their "lease", each released when the next one is asked for.

    The consumer must be done with a batch's CPU tensors by then. The trainer is: it copies a batch to the
    device (on CUDA the pin-memory thread has already copied it out of the pool), trains and logs on it
    before reading the next. On CPU the step itself is synchronous. When this stream ends or is closed, the
    buffers its batches came in are let go in this process: a reuse_memory loader is read through one such
    stream, once (as `train_stream` callers do: a new loader for each new stream).
    """
    pools: set[str] = set()
    try:
        for batch in stream:
            lease = batch.pop("lease", None)
            if lease is not None:
                pools.add(lease.pool)
            yield batch
            if lease is not None:
                lease.release()
    finally:  # the stream is done with: let go of its pools' memory
        for name in pools:
            _RECEIVED.pop(name, None)


class PooledBatch:
    """A pooled batch on its way out of a loader worker (`PooledCollate` returns it there). Pickled, it carries
    its slot's tensors and the pool's flags only the first time that slot's buffers go out; after that the
    slot's name and number. Unpickled in the consumer's process, it is the batch dict again, lease included."""

    def __init__(self, batch: dict[str, Any], pool: BatchPool) -> None:
        self.batch, self.pool = batch, pool

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        fields = dict(self.batch)
        lease, images = fields.pop("lease"), fields.pop("image")
        first = (lease.slot, lease.generation) not in self.pool.sent
        self.pool.sent.add((lease.slot, lease.generation))
        stacks = (images if isinstance(images, list) else [images]) if first else None
        numbers = {key: (value.tolist(), value.dtype) for key, value in fields.items() if isinstance(value, Tensor)}
        others = {key: value for key, value in fields.items() if key not in numbers}
        return _received_batch, (lease.pool, lease.slot, lease.generation, stacks, lease.flags if first else None,
                                 isinstance(images, list), numbers, others)


# In the consumer's process: pool name → {"flags": Tensor, slot: (generation, stacks)}.
_RECEIVED: dict[str, dict[Any, Any]] = {}


def _received_batch(pool: str, slot: int, generation: int, stacks: list[Tensor] | None, flags: Tensor | None,
                    multi: bool, numbers: dict[str, tuple[list, torch.dtype]], others: dict[str, Any]) -> dict:
    held = _RECEIVED.setdefault(pool, {})
    if stacks is not None:
        held["flags"], held[slot] = flags, (generation, stacks)
    if held.get(slot, (None,))[0] != generation:  # a worker's batches arrive in order: its buffers came first
        raise RuntimeError(f"pooled batch of slot {slot} (generation {generation}) arrived without its buffers: was "
                           "a reuse_memory loader iterated again after its released_after_use stream was closed?")
    images = held[slot][1]
    return {**others, **{key: torch.tensor(values, dtype=dtype) for key, (values, dtype) in numbers.items()},
            "image": list(images) if multi else images[0], "lease": BatchLease(held["flags"], slot, pool, generation)}
