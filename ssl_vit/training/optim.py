"""Schedules as pure functions of the optimizer step: a stream has no epoch length, and resume needs no state."""

from __future__ import annotations

import math


def cosine(step: int, total_steps: int, start: float, end: float) -> float:
    """Half-cosine from `start` at step 0 to `end` at `total_steps` (held at `end` afterwards)."""
    if total_steps <= 0:
        return end
    progress = min(max(step / total_steps, 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(step: int, total_steps: int, warmup_steps: int, peak: float, final: float = 0.0) -> float:
    """Linear warmup from 0 to `peak` over `warmup_steps`, then cosine decay to `final` at `total_steps`."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    return cosine(step - warmup_steps, total_steps - warmup_steps, peak, final)
