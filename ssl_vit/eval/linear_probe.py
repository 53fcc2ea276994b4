"""The `linear-probe` command's work: extract the val features once, train the grid on the fast path (fixed train
features, `linear.probe_features`) or the slow one (freshly augmented batches, `probe_augmented`), report."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor
from tqdm.auto import tqdm

from ssl_vit.data.samples import SKIP_REASONS
from ssl_vit.data.transforms import crop_flip, normalize
from ssl_vit.eval.features import Features, extract_features, image_features, skip_totals
from ssl_vit.eval.labelled import check_class_lists, check_usable, count_samples, labelled_train_stream
from ssl_vit.eval.linear import HeadTrainer, ProbeData, ProbeProtocol, probe_features
from ssl_vit.training.run_log import RunLog

PROBE_CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop default, used by both papers' probes


def probe_augmented(vit: VisionTransformer, data: ProbeData, proto: ProbeProtocol, val: Features,
                    num_classes: int | None, accelerator: Accelerator, seed: int = 0, log: RunLog | None = None,
                    ) -> tuple[dict[str, Any], int, dict[str, int]]:
    """Train the grid on augmented train batches (the global batch split over the ranks, data parallel), evaluate
    on the fixed `val` features every epoch. Returns the main process's summary, the train-set size and the
    skips met while drawing batches (by reason, all ranks; the stream resamples, so a bad sample can count twice)."""
    n_train = data.train_size or count_samples(data.train, data.allow_pipe)
    per_device = max(1, proto.batch_size // accelerator.num_processes)
    global_batch = per_device * accelerator.num_processes
    steps_per_epoch = max(1, n_train // global_batch)
    num_classes = max(num_classes or 0, int(val.labels.max()) + 1)
    vit = vit.to(accelerator.device).eval()
    trainer = HeadTrainer(proto, proto.features.dim(vit.embed_dim), num_classes, global_batch, steps_per_epoch,
                          seed, accelerator.device)
    # Gradients of the heads are averaged across ranks (DDP); the frozen backbone is never wrapped.
    model, trainer.optimizer = accelerator.prepare(trainer.model, trainer.optimizer)
    transform = crop_flip(vit.patch_embed.img_size[0], PROBE_CROP_SCALE)
    loader = labelled_train_stream(data.train, transform, num_classes, "the linear probe", batch_size=per_device,
                                   num_workers=data.num_workers, shuffle_buffer=data.shuffle_buffer,
                                   rank=accelerator.process_index, world_size=accelerator.num_processes, seed=seed,
                                   allow_pipe=data.allow_pipe)
    skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)

    def batches() -> Iterator[tuple[Tensor, Tensor]]:
        for batch in loader:
            skipped.add_(batch["skipped"].sum(dim=0))
            with torch.no_grad(), accelerator.autocast():
                images = normalize(batch["image"].to(accelerator.device, non_blocking=True))
                feats = image_features(vit, images, proto.features).float()
            bar.update(1)
            yield feats, batch["label"].to(accelerator.device)
    # closed on an error too: else its last refresh, at garbage collection, lands after the error message
    with tqdm(total=proto.epochs * steps_per_epoch, desc="linear probe (augmented)", unit="step",
              disable=not accelerator.is_main_process) as bar:
        summary = [trainer.fit(batches(), val, model, accelerator.backward, log)]
    broadcast_object_list(summary)  # BatchNorm running stats may differ by rank: report the main process's
    return summary[0], n_train, skip_totals(accelerator, skipped)


def linear_probe(vit: VisionTransformer, data: ProbeData, proto: ProbeProtocol, accelerator: Accelerator, *,
                 augment: bool = False, seed: int = 0, out_dir: str | Path | None = None,
                 meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Extract features, train the grid, report every head, the best on val and the skipped samples (train and
    val, by reason, all ranks). With `out_dir` (main process): linear_probe.json, log.jsonl and TensorBoard curves."""
    classes = check_class_lists(data.train, data.val, data.allow_pipe)  # before the backbone runs
    kwargs = dict(spec=proto.features, batch_size=data.batch_size, num_workers=data.num_workers,
                  crop_ratio=data.crop_ratio, allow_pipe=data.allow_pipe, cache_dir=data.cache_dir)
    val = extract_features(vit, data.val, accelerator, desc="probe val features", **kwargs)
    check_usable(val, "linear-probe", "val", classes)
    if out_dir is not None and accelerator.is_main_process:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    log = RunLog(out_dir, enabled=accelerator.is_main_process) if out_dir is not None else None
    try:
        if augment:
            summary, n_train, train_skipped = probe_augmented(vit, data, proto, val, classes and len(classes.names),
                                                              accelerator, seed, log)
        else:
            train = extract_features(vit, data.train, accelerator, desc="probe train features", **kwargs)
            check_usable(train, "linear-probe", "train", classes)
            # Every rank holds all features and trains the same grid from the same seed: no collective needed.
            # With a class list, a head per listed class, whether or not this train set shows every one.
            summary, _ = probe_features(train, val, proto, classes and len(classes.names), device=accelerator.device,
                                        seed=seed, log=log)
            n_train, train_skipped = train.features.shape[0], train.skipped
    finally:
        if log is not None:
            log.close()
    result = {**(meta or {}), "protocol": dataclasses.asdict(proto), "features": proto.features.describe(),
              "augment": augment, "n_train": n_train, "n_val": val.features.shape[0],
              "skipped": {"train": train_skipped, "val": val.skipped}, **summary}
    if out_dir is not None and accelerator.is_main_process:
        Path(out_dir, "linear_probe.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
