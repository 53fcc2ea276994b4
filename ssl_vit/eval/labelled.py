"""Labelled shards for supervised training on a backbone (augmented linear probe, fine-tuning), and the checks every
evaluation makes of their labels."""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
from PIL import Image

from ssl_vit.config.pretrain import DataConfig
from ssl_vit.data.samples import IMAGE_EXTS
from ssl_vit.data.shard_urls import resolve_shards
from ssl_vit.data.shards import train_stream
from ssl_vit.eval.features import Features
from ssl_vit.eval.metrics import check_labelled

_SEED_OFFSET = 1000  # streams of their own, never equal to a pretraining stream with the same seed


def labelled_train_stream(shards: str, transform: Callable[[Image.Image], torch.Tensor], num_classes: int,
                          task: str, *, batch_size: int, num_workers: int, shuffle_buffer: int, rank: int,
                          world_size: int, seed: int, start_step: int = 0, skip: int = 0,
                          allow_pipe: bool = False) -> Iterator[dict]:
    """Endless shuffled full batches {"image", "label", "key", "skipped"}: the pretraining stream (resampled,
    reseeded at `start_step`, the first `skip` batches dropped), labels kept and checked (`checked_labels`)."""
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be ≥ 0, got {shuffle_buffer}")
    cfg = DataConfig(train=shards, batch_size=batch_size, num_workers=num_workers, shuffle_buffer=shuffle_buffer,
                     allow_pipe=allow_pipe)
    stream = train_stream(cfg, transform, rank=rank, world_size=world_size, seed=seed + _SEED_OFFSET,
                          start_step=start_step, with_label=True)
    return checked_labels(islice(stream, skip, None), num_classes, task)


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


@dataclass(frozen=True)
class ClassList:
    """The classes of a labelled set: label i names `names[i]`, the i-th non-blank line of `path`."""

    path: Path
    names: list[str]


def check_class_lists(train: str | Sequence[str], val: str | Sequence[str],
                      allow_pipe: bool = False) -> ClassList | None:
    """The class list of the train shards (else of the val shards), refusing train and val lists that differ:
    labels are indices into them, so a differing list makes the score wrong silently. None without either list."""
    lists = []
    for shards in (train, val):  # the classes.txt that `make-shards` writes beside the (first) shard
        listing = Path(resolve_shards(shards, allow_pipe)[0].removeprefix("file:")).parent / "classes.txt"
        if listing.is_file():
            lists.append(ClassList(listing, [line for line in listing.read_text().splitlines() if line.strip()]))
    if len(lists) == 2 and lists[0].names != lists[1].names:
        a, b = lists[0].names, lists[1].names
        i = next(i for i in range(max(len(a), len(b))) if i >= len(a) or i >= len(b) or a[i] != b[i])
        shown = [repr(n[i]) if i < len(n) else "nothing (end of list)" for n in (a, b)]
        raise ValueError(f"train and val shards list different classes (labels are indices into them): "
                         f"{lists[0].path} ({len(a)} classes) vs {lists[1].path} ({len(b)}), first difference at "
                         f"class {i}: {shown[0]} vs {shown[1]}")
    return lists[0] if lists else None


def checked_labels(batches: Iterator[dict], num_classes: int, task: str) -> Iterator[dict]:
    """`batches` of a train stream, refusing a label outside [0, num_classes) (or none), on the loader's CPU labels:
    on the device the check would stall every batch."""
    for batch in batches:
        bad = (batch["label"] < 0) | (batch["label"] >= num_classes)
        if bad.any():
            i = int(bad.nonzero()[0, 0])
            raise ValueError(f"{task} needs labels in [0, {num_classes}) on every train sample: sample "
                             f"{batch['key'][i]!r} has {int(batch['label'][i])}")
        yield batch


def check_usable(feats: Features, task: str, split: str, classes: ClassList | None = None) -> None:
    """Refuse a set of which no sample could be used, saying why (skip counts by reason), unlabelled samples and
    labels ≥ the listed classes (the list is stale), or without a list ≥ MAX_CLASSES."""
    skipped = {reason: n for reason, n in feats.skipped.items() if n}
    if not feats.features.shape[0] and not skipped:
        raise ValueError(f"no {task} {split} sample was read: the {split} shards hold no samples")
    if not feats.features.shape[0]:
        raise ValueError(f"no usable {task} {split} sample was read: all {sum(skipped.values())} {split} samples "
                         f"were skipped: {skipped}")
    check_labelled(feats.labels, task, split, *((len(classes.names), f"in {classes.path}") if classes else ()))
