"""What the training loop measures between two log steps, and the run-wide counters it checkpoints."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator

from ssl_vit.data.samples import SKIP_REASONS

SKIP_RATE_MIN_SAMPLES = 1000  # judge the skip rate only once this many samples were read (all ranks)


class RunAborted(RuntimeError):
    """The run stopped itself for a reason a person must look at (bad data, diverged loss)."""


@dataclass
class Counters:
    """Run-wide totals over all ranks, kept in every checkpoint so curves continue across a resume."""

    images: int = 0  # usable samples read
    skipped: list[int] = field(default_factory=lambda: [0] * len(SKIP_REASONS))  # by reason, SKIP_REASONS order
    nonfinite_steps: int = 0  # updates skipped for a NaN/inf loss or gradient norm

    def check_skip_rate(self, max_rate: float) -> None:
        seen = self.images + sum(self.skipped)
        if seen >= SKIP_RATE_MIN_SAMPLES and sum(self.skipped) > max_rate * seen:
            by_reason = ", ".join(f"{r}={n}" for r, n in zip(SKIP_REASONS, self.skipped, strict=True) if n)
            raise RunAborted(f"{sum(self.skipped)} of {seen} samples could not be used ({by_reason}), more than "
                             f"data.max_skip_rate={max_rate}; check the shards (see docs/troubleshooting.md)")


class StepWindow:
    """Per-rank sums since the last log step; `reduce` turns them into logged scalars (a collective)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss, self.finite_steps, self.steps = 0.0, 0, 0
        self.wait, self.time, self.images = 0.0, 0.0, 0
        self.skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long, device=self.device)
        self.extra: dict[str, torch.Tensor] = {}

    def add_batch(self, batch: dict[str, Any]) -> None:
        images = batch["image"]
        # rows device decode refilled with a copy of another image are counted as skipped, not as images
        rows = (images[0] if isinstance(images, (list, tuple)) else images).shape[0]
        self.images += rows - batch.get("refilled", 0)
        self.skipped += batch["skipped"].sum(0)

    def add_step(self, loss: torch.Tensor | None, wait: float, seconds: float, extra: dict[str, torch.Tensor]) -> None:
        """`loss` None: the update was skipped. Sums stay on the device until `reduce`: no host sync per step."""
        self.steps += 1
        self.wait += wait
        self.time += seconds
        if loss is not None:
            self.loss = self.loss + loss.detach().float().reshape(())
            self.finite_steps += 1
            for name, value in extra.items():
                value = value.detach().float().reshape(())
                self.extra[name] = self.extra[name] + value if name in self.extra else value

    def reduce(self, accelerator: Accelerator, counters: Counters) -> dict[str, float]:
        """Window means over steps and ranks; adds the window's images and skips to `counters`."""
        n, world, device = max(self.finite_steps, 1), accelerator.num_processes, accelerator.device
        names = sorted(self.extra)
        # a window of skipped updates only has no loss: NaN, not a perfect 0 (the skip is agreed on every rank)
        loss = self.loss / n if self.finite_steps else torch.full((), math.nan)
        # One tensor of sums over ranks, one collective, one read to the host: means are divided out here.
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        host = torch.tensor([self.wait, self.time, self.images], dtype=dtype).to(device)
        values = torch.cat([loss.to(device, dtype).reshape(1), host,
                            *[(self.extra[k] / n).to(device, dtype).reshape(1) for k in names],
                            self.skipped.to(device, dtype)])
        total = accelerator.reduce(values, reduction="sum").tolist()
        loss_mean, wait, elapsed, images = total[0] / world, total[1] / world, total[2] / world, round(total[3])
        extras, skipped = total[4:4 + len(names)], [round(c) for c in total[4 + len(names):]]
        counters.images += images
        counters.skipped = [a + b for a, b in zip(counters.skipped, skipped, strict=True)]
        seconds = max(elapsed, 1e-9)
        scalars = {
            "train/loss": loss_mean,
            "perf/images_per_s": images / seconds,
            "perf/data_wait_share": wait / seconds,
            "perf/step_time_s": seconds / max(self.steps, 1),
            "train/nonfinite_steps": float(counters.nonfinite_steps),
        }
        scalars.update({f"train/{k}": v / world for k, v in zip(names, extras, strict=True)})
        scalars.update({f"data/skipped_{r}": float(c) for r, c in zip(SKIP_REASONS, counters.skipped, strict=True)})
        self.reset()
        return scalars
