"""Building the Accelerator: the one place that knows how processes find each other, how they share the CPU
cores, and what a run cannot do under FSDP."""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from ssl_vit.config.schema import ConfigError

if TYPE_CHECKING:
    from ssl_vit.config.pretrain import Config


def _has_accelerator() -> bool:
    probe = getattr(torch, "accelerator", None)  # torch ≥ 2.6 covers CUDA, XPU, MPS, ...
    return bool(probe.is_available()) if probe is not None else torch.cuda.is_available()


def resolve_precision(requested: str | None) -> str:
    """The mixed precision to run with: the config's, when it names one; else the launcher's.

    `accelerate launch --mixed_precision X` (or `mixed_precision: X` in its config file) reaches the processes as
    ACCELERATE_MIXED_PRECISION; launch sets it to "no" when given nothing, and it is unset outside a launcher.
    An explicit config value wins over it (a recipe is the record of the run), with a warning where they disagree.
    """
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
    """An Accelerator for this process, also forming a real multi-process CPU group where there is no GPU.

    `mixed_precision`: no | fp16 | bf16 | auto (bf16 on CUDA, else no); None takes the launcher's (see
    `resolve_precision`). Accelerate (1.x) only picks its gloo MULTI_CPU mode when told `cpu=True`. Without it,
    each process of `accelerate launch --multi_gpu --num_processes N` on a CPU-only machine silently trains alone,
    as rank 0 of 1, and N runs overwrite one another's files.
    """
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision=resolve_precision(mixed_precision),
                       cpu=multi_process and not _has_accelerator())


def share_cpu_cores(accelerator: Accelerator, num_workers: int) -> None:
    """On CPU, leave each loader worker a core: torch's default of one thread per core plus busy workers
    oversubscribes the machine, and spinning OpenMP threads then make steps several times slower.
    An explicit OMP_NUM_THREADS wins."""
    if accelerator.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    per_process = (os.cpu_count() or 1) // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    torch.set_num_threads(max(1, per_process - num_workers))


def check_fsdp_supported(cfg: Config, accelerator: Accelerator) -> None:
    """What reads the whole model on the main process alone fails under FSDP, whose ranks each hold a shard
    (docs/distributed.md): the end-of-run export, and MAE's reconstruction images (the encoder and decoder run
    outside the root module's forward, on rank 0 only: it fails, and the other ranks wait in the next
    collective). Refused before training rather than at the first image or after days of training."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    if cfg.train.export:
        raise ConfigError("train.export: the backbone export does not work under FSDP (each rank holds a shard); "
                          "set train.export=false (docs/distributed.md)")
    if cfg.objective == "mae" and cfg.train.image_every:
        raise ConfigError("train.image_every: MAE's reconstruction images do not work under FSDP (each rank holds "
                          "a shard); set train.image_every=0 (docs/distributed.md)")
