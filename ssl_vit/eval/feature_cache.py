"""On-disk cache of extracted features (safetensors), keyed by everything the features depend on: the
backbone's weights and architecture, the feature spec, the transform, the mixed precision and the shards
(resolved URLs; size and mtime of local files, so data rewritten with its mtime kept is not detected)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from ssl_vit.data.shard_urls import resolve_shards
from ssl_vit.training.checkpoint import save_shared

_VERSION = 3  # bump when the extraction changes (2: skip counts stored, repeated keys kept; 3: fc_norm applied)


def cache_path(cache_dir: str | Path, vit: VisionTransformer, shards: str | Sequence[str], spec: dict[str, Any],
               crop_ratio: float, precision: str, allow_pipe: bool = False) -> Path:
    """The cache file for these features (it may not exist yet). `spec`: the feature options as a dict;
    `precision`: the autocast they are computed under (Accelerate's mixed_precision), which changes them."""
    weights = hashlib.sha256()  # every weight, and the structure (heads, image size: what weights alone don't show)
    arch = {"repr": repr(vit), "img_size": list(vit.patch_embed.img_size),
            "heads": [getattr(b.attn, "num_heads", None) for b in vit.blocks]}
    weights.update(json.dumps(arch, sort_keys=True).encode())
    for name, tensor in vit.state_dict().items():
        t = tensor.detach().to("cpu").contiguous().reshape(-1)
        weights.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        weights.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    data = []  # each resolved shard, with (size, mtime_ns) for local files; remote URLs by name only
    for url in resolve_shards(shards, allow_pipe):
        local = Path(url.removeprefix("file:"))
        st = local.stat() if local.is_file() else None
        data.append([str(local.resolve()), st.st_size, st.st_mtime_ns] if st else [url])
    key = {"version": _VERSION, "backbone": weights.hexdigest(), "spec": spec, "crop_ratio": crop_ratio,
           "precision": precision, "data": data}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return Path(cache_dir) / f"features-{digest}.safetensors"


def save_cached(path: Path, features: Tensor, labels: Tensor, keys: list[str], skipped: dict[str, int]) -> None:
    """Write atomically (temp file, then rename): a killed run never leaves a truncated cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Keys as one newline-joined UTF-8 byte tensor: safetensors metadata headers are size-limited.
    key_bytes = torch.frombuffer(bytearray("\n".join(keys).encode()), dtype=torch.uint8) if keys \
        else torch.zeros(0, dtype=torch.uint8)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_shared({"features": features.contiguous(), "labels": labels.contiguous(), "keys": key_bytes},
                tmp, metadata={"n": str(len(keys)), "skipped": json.dumps(skipped)})
    tmp.replace(path)


def load_cached(path: Path) -> tuple[Tensor, Tensor, list[str], dict[str, int]]:
    """Features, labels, keys and skip counts (by reason) as `save_cached` wrote them."""
    try:
        with safe_open(str(path), "pt") as f:
            skipped = json.loads((f.metadata() or {}).get("skipped", "{}"))
            features, labels, keys = (f.get_tensor(name) for name in ("features", "labels", "keys"))
        text = bytes(keys.numpy()).decode()
    except Exception as err:  # safetensors', JSON's, UTF-8's error: damaged outside this code (writes are atomic)
        raise ValueError(f"feature cache {path} cannot be read ({type(err).__name__}: {err}); delete it to extract "
                         "the features again") from None
    return features, labels, text.split("\n") if text else [], skipped
