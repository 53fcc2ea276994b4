"""DINO's collapse monitor: teacher entropy in a collapsed band (one-hot or uniform) for a window of steps, counted
on the device and read every `window` steps and at the end (docs/dino.md, "The warning")."""

from __future__ import annotations

import math
import warnings

import torch
import torch.distributed as dist
from torch import Tensor

COLLAPSE_WINDOW = 200  # rides out a random teacher's near-uniform start (docs/dino.md)
COLLAPSE_LOW, COLLAPSE_HIGH = 0.05, 0.98  # collapsed bands, as fractions of log(out_dim): one-hot / uniform
_KINDS = {1: "one-hot", 2: "uniform"}
_BAND, _RUN, _ALARM_STEP, _ALARM_BAND, _ALARM_ENTROPY = range(5)  # the fields of `CollapseWatch.state`


class CollapseWarning(UserWarning):
    """The teacher's output looks collapsed (one-hot or uniform) for a sustained window of steps."""


class CollapseWatch:
    """`update(entropy, step)` once per optimizer step; rank 0 warns once per episode of ≥ `window` steps."""

    def __init__(self, out_dim: int, window: int, watched: str = "DINO") -> None:
        if window < 1:
            raise ValueError(f"collapse_window must be ≥ 1, got {window}")
        self.log_k, self.window, self.watched = math.log(out_dim), window, watched  # watched: named in the warning
        # float32 on the device (MPS has no float64): last band (0 none, 1 one-hot, 2 uniform), its run length,
        # and the step the latest episode reached the window (-1: none yet), its band and entropy
        self.state: Tensor | None = None
        self.reported = -1.0  # the alarm step of the episode warned about last

    def update(self, entropy: Tensor, step: int) -> None:
        entropy = entropy.detach().to(torch.float32)
        if self.state is None or self.state.device != entropy.device:
            self.state = torch.tensor([0.0, 0.0, -1.0, 0.0, 0.0], device=entropy.device)  # no alarm yet
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
        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            first, last = int(alarm_step) - self.window + 1, int(alarm_step)
            warnings.warn(f"{self.watched} looks collapsed ({_KINDS[int(band)]}): teacher entropy {entropy:.3f} nats "
                          f"(log K = {self.log_k:.2f}) for steps {first}-{last}; see docs/dino.md", CollapseWarning,
                          stacklevel=2)
