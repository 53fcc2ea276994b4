"""Checkpoints: torn markers never block a run, the marker is written whole or not at all, the resume check
reads shapes only, exports are shareable."""

import json
import os
import stat
from pathlib import Path

import pytest
import timm
import torch
from accelerate import Accelerator

from ssl_vit.training.checkpoint import (
    COMPLETE,
    complete_checkpoints,
    export_backbone,
    latest_checkpoint,
    save_checkpoint,
)


def fake_checkpoint(run_dir: Path, step: int, marker: str | None) -> Path:
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    if marker is not None:
        (path / COMPLETE).write_text(marker)
    return path


@pytest.mark.parametrize("bad", ["", '{"step": 4', '{"counters": {}}', "[4]", '{"step": "four"}'])
def test_an_unreadable_marker_counts_as_incomplete(tmp_path, bad):
    """An empty, cut-short or edited COMPLETE is skipped with a warning naming it, like a half-written checkpoint,
    instead of raising out of every resume and export."""
    good = fake_checkpoint(tmp_path, 2, json.dumps({"step": 2}))
    torn = fake_checkpoint(tmp_path, 4, bad)
    fake_checkpoint(tmp_path, 6, None)  # never marked: ignored silently
    with pytest.warns(UserWarning, match=f"ignoring checkpoint {torn}: unreadable COMPLETE marker"):
        assert latest_checkpoint(tmp_path) == (2, good)
    with pytest.warns(UserWarning):
        assert complete_checkpoints(tmp_path) == [(2, good)]


def test_the_marker_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A save killed while writing its marker leaves no marker (the checkpoint stays incomplete), never a torn one."""
    accelerator = Accelerator()
    accelerator.prepare(torch.nn.Linear(2, 2))
    original = Path.write_text

    def dies_half_way(self, data, *args, **kwargs):
        if COMPLETE in self.name:
            original(self, data[: len(data) // 2], *args, **kwargs)
            raise KeyboardInterrupt
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, tmp_path, step=3, keep_last=2)
    monkeypatch.setattr(Path, "write_text", original)
    assert not (tmp_path / "checkpoints" / "step_00000003" / COMPLETE).exists()
    assert complete_checkpoints(tmp_path) == []

    save_checkpoint(accelerator, tmp_path, step=3, keep_last=2)  # the next save at that step replaces the debris
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [3]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_exported_files_are_readable_per_the_umask(tmp_path, umask):
    """safetensors writes 0600 files; an exported backbone is for sharing, so it gets the umask's mode."""
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=48, depth=1, num_heads=2,
                            num_classes=0)
    previous = os.umask(umask)
    try:
        weights = export_backbone(vit, tmp_path, "vit_tiny_patch16_224", {})
    finally:
        os.umask(previous)
    for path in (weights, tmp_path / "backbone.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name


def test_model_mismatch_names_the_first_difference_and_allows_tied_weights(tmp_path):
    """The resume check reads the checkpoint's safetensors header; tied weights, saved once, are not missing."""
    from safetensors.torch import save_model

    from ssl_vit.training.checkpoint import model_mismatch

    def tied(width: int) -> torch.nn.Module:
        model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, width))
        model[1].weight = model[0].weight
        return model

    save_model(tied(4), str(tmp_path / "model.safetensors"))  # stores the shared weight under one name only
    assert model_mismatch(tied(4), tmp_path) is None
    assert model_mismatch(tied(3), tmp_path) == "0.bias has shape [4] in the checkpoint, [3] in this model"
    assert model_mismatch(torch.nn.Sequential(torch.nn.Linear(4, 4)), tmp_path) == (
        "1.bias is in the checkpoint, not in this model")
