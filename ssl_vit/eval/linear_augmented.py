"""The slow linear probe: every step encodes a freshly augmented batch (RandomResizedCrop + flip, as MAE's and
DINO's probes do), for parity with the papers' numbers. The grid of heads trains with data parallelism."""

from __future__ import annotations

from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from timm.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

from ssl_vit.data.samples import SKIP_REASONS
from ssl_vit.data.transforms import crop_flip, normalize
from ssl_vit.eval.features import Features, image_features, skip_totals
from ssl_vit.eval.labelled import classes_file_count, count_samples, labelled_train_stream
from ssl_vit.eval.linear import HeadTrainer, ProbeData, ProbeProtocol, log_epoch
from ssl_vit.training.run_log import RunLog

PROBE_CROP_SCALE = (0.08, 1.0)  # torchvision's RandomResizedCrop default, used by both papers' probes


def probe_augmented(vit: VisionTransformer, data: ProbeData, proto: ProbeProtocol, val: Features,
                    accelerator: Accelerator, seed: int = 0, log: RunLog | None = None,
                    ) -> tuple[dict[str, Any], int, dict[str, int]]:
    """Train the grid on augmented train batches, evaluate on the fixed `val` features after every epoch.

    The global batch `proto.batch_size` is split over the ranks; an epoch is train_size // global batch steps.
    Returns the summary (the main process's, on every rank), the train-set size and the unusable samples met
    while drawing the batches, by reason, all ranks summed (the stream resamples: one bad sample drawn twice
    counts twice).
    """
    n_train = data.train_size or count_samples(data.train, data.allow_pipe)
    per_device = max(1, proto.batch_size // accelerator.num_processes)
    global_batch = per_device * accelerator.num_processes
    steps_per_epoch = max(1, n_train // global_batch)
    num_classes = max(classes_file_count(data.train, data.allow_pipe) or 0, int(val.labels.max()) + 1)
    vit = vit.to(accelerator.device).eval()
    trainer = HeadTrainer(proto, proto.features.dim(vit.embed_dim), num_classes, global_batch, steps_per_epoch,
                          seed)
    trainer.model.to(accelerator.device).train()
    # Gradients of the heads are averaged across ranks (DDP); the frozen backbone is never wrapped.
    model, trainer.optimizer = accelerator.prepare(trainer.model, trainer.optimizer)
    transform = crop_flip(vit.patch_embed.img_size[0], PROBE_CROP_SCALE)
    loader = iter(labelled_train_stream(data.train, transform, batch_size=per_device,
                                        num_workers=data.num_workers, shuffle_buffer=data.shuffle_buffer,
                                        rank=accelerator.process_index,
                                        world_size=accelerator.num_processes, seed=seed, allow_pipe=data.allow_pipe))
    bar = tqdm(total=proto.epochs * steps_per_epoch, desc="linear probe (augmented)", unit="step",
               disable=not accelerator.is_main_process)
    step = 0
    skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
    for epoch in range(proto.epochs):
        losses = []
        for _ in range(steps_per_epoch):
            batch = next(loader)
            skipped += batch["skipped"].sum(dim=0)
            labels = batch["label"].to(accelerator.device)
            if (labels < 0).any() or (labels >= num_classes).any():
                raise ValueError(f"the linear probe needs labels in [0, {num_classes}) on every train sample")
            with torch.no_grad(), accelerator.autocast():
                images = normalize(batch["image"].to(accelerator.device, non_blocking=True))
                feats = image_features(vit, images, proto.features).float()
            losses.append(trainer.step(model, feats, labels, step, accelerator.backward))
            step += 1
            bar.update(1)
        log_epoch(log, trainer, epoch + 1, sum(losses) / len(losses), trainer.evaluate(val))
    bar.close()
    summary = [trainer.summary()]
    broadcast_object_list(summary)  # BatchNorm running stats may differ by rank: report the main process's
    return summary[0], n_train, skip_totals(accelerator, skipped)
