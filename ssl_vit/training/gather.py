"""Reads of the whole model outside the training step, which under FSDP (each rank holds a shard) every rank must
join: the backbone's full state dict for the export, and the objective's images (docs/distributed.md)."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import Tensor, nn

if TYPE_CHECKING:
    from ssl_vit.methods import Objective

# Name segments the FSDP1, activation-checkpointing and torch.compile wrappers add; state dicts leave them out.
_WRAPPERS = re.compile(r"(_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")


def backbone_state(accelerator: Accelerator, model: nn.Module, backbone: nn.Module) -> dict[str, Tensor] | None:
    """`backbone`'s state dict (a submodule of the prepared `model`) on the main process, None on the others; under
    FSDP every rank must call this: Accelerate's `get_state_dict` gathers all of `model` to the main process's CPU."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return backbone.state_dict() if accelerator.is_main_process else None
    full = accelerator.get_state_dict(model)  # a collective: rank 0 gets the tensors, the others an empty dict
    if not accelerator.is_main_process:
        return None
    name = next(n for n, m in accelerator.unwrap_model(model).named_modules() if m is backbone)
    prefix = _WRAPPERS.sub("", name + ".") if name else ""
    return {k[len(prefix):]: v for k, v in ((_WRAPPERS.sub("", k), v) for k, v in full.items())
            if k.startswith(prefix)}


def objective_images(accelerator: Accelerator, model: nn.Module, objective: Objective,
                     batch: dict[str, Any]) -> dict[str, Tensor] | None:
    """`objective.visualize(batch)` on the main process, None on the others; under FSDP every rank must call it."""
    if accelerator.distributed_type != DistributedType.FSDP:
        return objective.visualize(batch) if accelerator.is_main_process else None
    # Run it as the prepared model's forward: FSDP (1 and 2) gathers the root's own weights around that call and
    # each wrapped block gathers its own, so every rank runs it, each on its own batch.
    patched = objective.__dict__.get("forward")  # Accelerate's autocast wrapper, when it set one
    objective.forward = lambda batch, step: objective.visualize(batch)
    try:
        with accelerator.autocast():  # as in a training step: FSDP's mixed precision may hand it bf16 weights
            images = model(batch, 0)
    finally:
        if patched is None:
            del objective.forward
        else:
            objective.forward = patched
    return images if accelerator.is_main_process else None
