"""The `linear-probe` command's work: extract the val features once, train the grid on the fast path (fixed train
features, `linear.probe_features`) or the slow one (augmented batches, `linear_augmented`), report."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from timm.models.vision_transformer import VisionTransformer

from ssl_vit.eval.features import extract_features
from ssl_vit.eval.labelled import check_class_lists, check_label_range, check_usable
from ssl_vit.eval.linear import ProbeData, ProbeProtocol, probe_features
from ssl_vit.eval.linear_augmented import probe_augmented
from ssl_vit.training.run_log import RunLog


def linear_probe(vit: VisionTransformer, data: ProbeData, proto: ProbeProtocol, accelerator: Accelerator, *,
                 augment: bool = False, seed: int = 0, out_dir: str | Path | None = None,
                 meta: dict[str, Any] | None = None) -> dict[str, Any]:
    """Extract features, train the grid, report every head and the best on val, and the samples the loader
    could not use ("skipped": train and val, by reason, all ranks); train and val must list the same classes
    (`check_class_lists`). With `out_dir` (main process):
    `linear_probe.json`, `log.jsonl` and TensorBoard curves (val top-1 per head per epoch) there."""
    classes = check_class_lists(data.train, data.val, data.allow_pipe)  # before the backbone runs
    kwargs = dict(spec=proto.features, batch_size=data.batch_size, num_workers=data.num_workers,
                  crop_ratio=data.crop_ratio, allow_pipe=data.allow_pipe, cache_dir=data.cache_dir)
    val = extract_features(vit, data.val, accelerator, desc="probe val features", **kwargs)
    check_usable(val, "linear-probe", "val")
    check_label_range(val.labels, classes, "linear-probe", "val")
    if out_dir is not None and accelerator.is_main_process:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
    log = RunLog(out_dir, enabled=accelerator.is_main_process) if out_dir is not None else None
    try:
        if augment:
            summary, n_train, train_skipped = probe_augmented(vit, data, proto, val, accelerator, seed=seed, log=log)
        else:
            train = extract_features(vit, data.train, accelerator, desc="probe train features", **kwargs)
            check_usable(train, "linear-probe", "train")
            check_label_range(train.labels, classes, "linear-probe", "train")
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
