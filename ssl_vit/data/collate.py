"""Samples → one batch: torch's `default_collate`, plus the skip counts and device-decode payloads."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import default_collate

from ssl_vit.data.device.decode import pack_payloads

_OWN = ("image", "jpeg", "skipped")  # the fields collated here, not by default_collate


def collate(samples: list[dict]) -> dict[str, Any]:
    """`default_collate` of the samples, skip counts as one LongTensor (B, reasons); JPEG payloads packed into
    one "jpeg" tensor (`pack_payloads`); a lone skip-count sample makes a batch of no images and no keys."""
    skipped = torch.tensor([s["skipped"] for s in samples], dtype=torch.long)
    first = samples[0]
    if first["image"] is None and first.get("key", "") is None:  # lone skip counts
        return {"image": torch.empty(0), "skipped": skipped, "label": torch.empty(0, dtype=torch.long), "key": []}
    batch = default_collate([{k: v for k, v in s.items() if k not in _OWN} for s in samples])
    batch["skipped"] = skipped
    if "jpeg" in first:
        decoded = [s["image"] for s in samples if s["image"] is not None]
        batch["image"] = default_collate(decoded) if decoded else torch.empty(0, dtype=torch.uint8)
        batch["jpeg"], batch["jpeg_sizes"] = pack_payloads([s["jpeg"] for s in samples])
    else:
        batch["image"] = default_collate([s["image"] for s in samples])
    return batch
