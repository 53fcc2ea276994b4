"""The step window's figures: images counted once, a window of skipped updates without a made-up loss."""

import math

import torch
from accelerate import Accelerator

from ssl_vit.data.samples import SKIP_REASONS
from ssl_vit.training.monitor import Counters, StepWindow

CORRUPT = SKIP_REASONS.index("corrupt_image")


def _batch(rows: int, corrupt: int = 0, **extra) -> dict:
    skipped = torch.zeros(rows, len(SKIP_REASONS), dtype=torch.long)
    skipped[0, CORRUPT] = corrupt
    return {"image": torch.zeros(rows, 3, 4, 4), "skipped": skipped, **extra}


def test_rows_device_decode_refilled_count_as_skipped_not_as_images():
    window, counters = StepWindow(torch.device("cpu")), Counters()
    window.add_batch(_batch(4, corrupt=1, refilled=1))  # 3 images decoded, 1 corrupt row holding a copy
    window.add_batch(_batch(4))
    window.add_step(torch.tensor(1.0), 0.0, 1.0, {})
    window.reduce(Accelerator(), counters)
    assert counters.images == 7 and counters.skipped[CORRUPT] == 1  # 8 samples read: 7 images, 1 skipped


def test_a_window_of_skipped_updates_logs_no_loss():
    window = StepWindow(torch.device("cpu"))
    window.add_batch(_batch(4))
    window.add_step(None, 0.0, 1.0, {"grad_norm": torch.tensor(2.0)})  # non-finite: skipped
    assert math.isnan(window.reduce(Accelerator(), Counters())["train/loss"])


def test_window_means_over_its_finite_steps():
    window, counters = StepWindow(torch.device("cpu")), Counters()
    window.add_batch(_batch(4))
    window.add_step(torch.tensor(1.0), 0.5, 2.0, {"grad_norm": torch.tensor(3.0)})
    window.add_batch(_batch(4, corrupt=2))
    window.add_step(None, 0.0, 1.0, {"grad_norm": torch.tensor(100.0)})  # skipped: no loss, no extras
    window.add_batch(_batch(4))
    window.add_step(torch.tensor(2.0), 0.25, 1.0, {"grad_norm": torch.tensor(5.0)})
    scalars = window.reduce(Accelerator(), counters)
    assert scalars["train/loss"] == 1.5 and scalars["train/grad_norm"] == 4.0
    assert scalars["perf/images_per_s"] == 12 / 4.0 and scalars["perf/data_wait_share"] == 0.75 / 4.0
    assert scalars["perf/step_time_s"] == 4.0 / 3 and scalars["data/skipped_corrupt_image"] == 2.0
    assert counters.images == 12 and counters.skipped[CORRUPT] == 2
