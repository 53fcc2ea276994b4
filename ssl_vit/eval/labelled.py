"""Labelled shards for supervised training on a backbone (augmented linear probe, fine-tuning), and the checks every
evaluation makes of their labels."""

from __future__ import annotations

import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from ssl_vit.config.pretrain import DataConfig
from ssl_vit.data.samples import IMAGE_EXTS
from ssl_vit.data.shard_urls import resolve_shards
from ssl_vit.data.shards import train_stream
from ssl_vit.eval.features import Features

_SEED_OFFSET = 1000  # streams of their own, never equal to a pretraining stream with the same seed


def labelled_train_stream(shards: str, transform: Callable[[Image.Image], torch.Tensor], *, batch_size: int,
                          num_workers: int, shuffle_buffer: int, rank: int, world_size: int, seed: int,
                          start_step: int = 0, allow_pipe: bool = False,
                          max_image_pixels: int = DataConfig.max_image_pixels) -> Iterator[dict]:
    """Endless shuffled full batches {"image", "label" (-1 if none), "key", "skipped"}: the pretraining stream
    (resampled, reseeded at `start_step`) with the labels kept."""
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be ≥ 0, got {shuffle_buffer}")
    cfg = DataConfig(train=shards, batch_size=batch_size, num_workers=num_workers, shuffle_buffer=shuffle_buffer,
                     max_image_pixels=max_image_pixels, allow_pipe=allow_pipe)
    return iter(train_stream(cfg, transform, rank=rank, world_size=world_size, seed=seed + _SEED_OFFSET,
                             start_step=start_step, with_label=True))


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


def classes_file(shards: str | Sequence[str], allow_pipe: bool = False) -> Path | None:
    """The `classes.txt` that `make-shards` writes beside the (first) shard; None if there is none."""
    first = Path(resolve_shards(shards, allow_pipe)[0].removeprefix("file:"))
    listing = first.parent / "classes.txt"
    return listing if listing.is_file() else None


@dataclass(frozen=True)
class ClassList:
    """The classes of a labelled set: label i names `names[i]`, the i-th non-blank line of `path`."""

    path: Path
    names: list[str]


def check_class_lists(train: str | Sequence[str], val: str | Sequence[str],
                      allow_pipe: bool = False) -> ClassList | None:
    """The class list of the train shards (else of the val shards), refusing train and val lists that differ:
    labels are indices into them, so a differing list makes the score wrong silently. None without either list."""
    train_file, val_file = classes_file(train, allow_pipe), classes_file(val, allow_pipe)
    lists = [ClassList(f, [line for line in f.read_text().splitlines() if line.strip()])
             for f in (train_file, val_file) if f is not None]
    if len(lists) == 2 and lists[0].names != lists[1].names:
        a, b = lists[0].names, lists[1].names
        i = next(i for i in range(max(len(a), len(b))) if i >= len(a) or i >= len(b) or a[i] != b[i])
        shown = [repr(n[i]) if i < len(n) else "nothing (end of list)" for n in (a, b)]
        raise ValueError(f"train and val shards list different classes (labels are indices into them): "
                         f"{train_file} ({len(a)} classes) vs {val_file} ({len(b)}), first difference at "
                         f"class {i}: {shown[0]} vs {shown[1]}")
    return lists[0] if lists else None


def check_label_range(labels: Tensor, classes: ClassList | None, task: str, split: str) -> None:
    """Refuse labels ≥ the number of listed classes: the shards and their classes.txt disagree (a stale list)."""
    if classes is not None:
        check_label_count(labels, len(classes.names), f"in {classes.path}", task, split)


def check_label_count(labels: Tensor, n: int, where: str, task: str, split: str) -> None:
    """Refuse labels ≥ `n`, the number of classes `where` ("in A/classes.txt", "of the model")."""
    beyond = labels >= n
    if beyond.any():
        raise ValueError(f"{task} {split} labels must be < the {n} classes {where}: {int(beyond.sum())} of "
                         f"{labels.numel()} samples have a larger one (up to {int(labels.max())})")


def check_usable(feats: Features, task: str, split: str) -> None:
    """Refuse a set of which no sample could be used, saying why (skip counts by reason)."""
    if feats.features.shape[0]:
        return
    skipped = {reason: n for reason, n in feats.skipped.items() if n}
    if not skipped:
        raise ValueError(f"no {task} {split} sample was read: the {split} shards hold no samples")
    raise ValueError(f"no usable {task} {split} sample was read: all {sum(skipped.values())} {split} samples "
                     f"were skipped: {skipped}")
