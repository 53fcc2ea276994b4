"""The Accelerator: how processes find each other and share the CPU cores."""

from __future__ import annotations

import os
import warnings

import torch
from accelerate import Accelerator


def resolve_precision(requested: str | None) -> str:
    """The config's mixed precision when it names one (a recipe is the record of the run), with a warning where
    the launcher's (ACCELERATE_MIXED_PRECISION) disagrees; else the launcher's (docs/distributed.md)."""
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if requested is None:
        return launcher
    resolved = ("bf16" if torch.cuda.is_available() else "no") if requested == "auto" else requested
    # "no" is also what launch passes when given nothing, so only a launcher asking for mixed precision can clash
    if launcher not in ("no", resolved) and os.environ.get("RANK", "0") == "0":
        warnings.warn(f"train.precision={requested!r} ({resolved}) overrides the launcher's --mixed_precision "
                      f"{launcher}; leave train.precision unset (null) to use the launcher's", stacklevel=2)
    return resolved


def make_accelerator(mixed_precision: str | None = None) -> Accelerator:
    """An Accelerator for this process; `mixed_precision`: no | fp16 | bf16 | auto | None (the launcher's).
    Accelerate only forms a multi-process gloo group without a GPU when told `cpu=True` (docs/distributed.md)."""
    probe = getattr(torch, "accelerator", None)  # torch ≥ 2.6 covers CUDA, XPU, MPS, ...
    has_accelerator = bool(probe.is_available()) if probe is not None else torch.cuda.is_available()
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=resolve_precision(mixed_precision), cpu=multi_process and not has_accelerator)


def share_cpu_cores(accelerator: Accelerator, num_workers: int) -> None:
    """On CPU, leave each loader worker a core (spinning OpenMP threads on an oversubscribed machine make steps
    several times slower); an explicit OMP_NUM_THREADS wins."""
    if accelerator.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    per_process = (os.cpu_count() or 1) // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    torch.set_num_threads(max(1, per_process - num_workers))

