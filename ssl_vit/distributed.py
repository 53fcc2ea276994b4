"""Building the Accelerator: the one place that knows how processes find each other."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator


def _has_accelerator() -> bool:
    probe = getattr(torch, "accelerator", None)  # torch ≥ 2.6 covers CUDA, XPU, MPS, ...
    return bool(probe.is_available()) if probe is not None else torch.cuda.is_available()


def make_accelerator(mixed_precision: str = "no") -> Accelerator:
    """An Accelerator for this process, also forming a real multi-process CPU group where there is no GPU.

    Accelerate (1.x) only picks its gloo MULTI_CPU mode when told `cpu=True`. Without it, each process of
    `accelerate launch --multi_gpu --num_processes N` on a CPU-only machine silently trains alone, as rank 0
    of 1, and N runs overwrite one another's files.
    """
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if mixed_precision == "auto":  # bf16 autocast where it pays (CUDA), fp32 on CPU
        mixed_precision = "bf16" if torch.cuda.is_available() else "no"
    return Accelerator(mixed_precision=mixed_precision, cpu=multi_process and not _has_accelerator())
