"""DINO's collapse monitor: the teacher entropy held in a collapsed band (one-hot or uniform) for a window of steps.

Counted on the device and read by the host only every `window` steps and at the end (docs/dino.md, "The warning").
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import Tensor

# Steps the teacher entropy must stay in a collapsed band before we warn: long enough to ride out the first
# steps (a random teacher maps all images alike, so its centered output starts near uniform), short next to
# a run.
COLLAPSE_WINDOW = 200
COLLAPSE_LOW, COLLAPSE_HIGH = 0.05, 0.98  # collapsed bands, as fractions of log(out_dim): one-hot / uniform
_KINDS = {1: "one-hot", 2: "uniform"}
_BAND, _RUN, _ALARM_STEP, _ALARM_BAND, _ALARM_ENTROPY = range(5)  # the fields of `CollapseWatch.state`


class CollapseWarning(UserWarning):
    """The teacher's output looks collapsed (one-hot or uniform) for a sustained window of steps."""


def _is_main_rank() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class CollapseWatch:
    """`update(entropy, step)` once per optimizer step; rank 0 warns once per episode of ≥ `window` steps."""

    def __init__(self, out_dim: int, window: int) -> None:
        if window < 1:
            raise ValueError(f"collapse_window must be ≥ 1, got {window}")
        self.log_k, self.window = math.log(out_dim), window
        # float32 on the entropy's device (MPS has no float64; steps are exact up to 2^24): the last step's band
        # (0 none, 1 one-hot, 2 uniform), the length of its run, and the step at which the latest episode reached
        # the window (-1: none yet), its band and entropy
        self.state: Tensor | None = None
        self.reported = -1.0  # the alarm step of the episode warned about last

    def update(self, entropy: Tensor, step: int) -> None:
        entropy = entropy.detach().to(torch.float32)
        if self.state is None or self.state.device != entropy.device:
            self.state = torch.zeros(5, dtype=torch.float32, device=entropy.device)
            self.state[_ALARM_STEP] = -1.0
        band = (entropy < COLLAPSE_LOW * self.log_k).float() + 2 * (entropy > COLLAPSE_HIGH * self.log_k).float()
        prev, run = self.state[_BAND], self.state[_RUN]
        in_band = band > 0
        run = torch.where(in_band & (band == prev), run + 1, in_band.float())
        alarm = run == self.window  # this step completes an episode's window
        old = self.state[_ALARM_STEP:]
        new = torch.stack([torch.full_like(band, float(step)), band, entropy])
        self.state = torch.cat([torch.stack([band, run]), torch.where(alarm, new, old)])
        if (step + 1) % self.window == 0:
            self.report()

    def report(self) -> None:
        """Read the device counters (a host sync) and warn about an episode not warned about yet."""
        if self.state is None:
            return
        alarm_step, band, entropy = self.state[_ALARM_STEP:].tolist()
        if alarm_step < 0 or alarm_step == self.reported:
            return
        self.reported = alarm_step
        if _is_main_rank():
            first, last = int(alarm_step) - self.window + 1, int(alarm_step)
            warnings.warn(f"DINO looks collapsed ({_KINDS[int(band)]}): teacher entropy {entropy:.3f} nats (log K = "
                          f"{self.log_k:.2f}) for steps {first}-{last}; see docs/dino.md", CollapseWarning,
                          stacklevel=2)
