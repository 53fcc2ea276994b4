"""Checkpoints: torn markers never block a run, the marker is written whole or not at all, the resume check
reads shapes only, exports are shareable."""

import json
import os
import shutil
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
from ssl_vit.training.marker import write_marker


def fake_checkpoint(run_dir: Path, step: int, marker: str | None) -> Path:
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"weights")
    if marker == "sealed":
        write_marker(path, step)
    elif marker is not None:
        (path / COMPLETE).write_text(marker)
    return path


def notes(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ssl_vit.training.checkpoint"]


@pytest.mark.parametrize("bad", ["", '{"step": 4', '{"counters": {}}', "[4]", '{"step": "four"}'])
def test_an_unreadable_marker_counts_as_incomplete(tmp_path, bad, caplog):
    """An empty, cut-short or hand-made COMPLETE is skipped with a note naming it, like a half-written checkpoint,
    instead of raising out of every resume and export."""
    good = fake_checkpoint(tmp_path, 2, "sealed")
    torn = fake_checkpoint(tmp_path, 4, bad)
    fake_checkpoint(tmp_path, 6, None)  # never marked: ignored silently
    assert latest_checkpoint(tmp_path) == (2, good)
    assert complete_checkpoints(tmp_path) == [(2, good)]
    [note, *_] = notes(caplog)
    assert note.startswith(f"ignoring checkpoint {torn}: ") and note.endswith("; it counts as incomplete")
    assert ("unreadable COMPLETE marker" in note) == (bad in ("", '{"step": 4', "[4]"))


@pytest.mark.parametrize("special", ["fifo", "/dev/zero"])
def test_a_marker_that_is_no_regular_file_is_skipped_not_read(tmp_path, caplog, special):
    """A FIFO would block the read forever, /dev/zero fill the memory."""
    good = fake_checkpoint(tmp_path, 2, "sealed")
    odd = fake_checkpoint(tmp_path, 4, None)
    os.mkfifo(odd / COMPLETE) if special == "fifo" else os.symlink("/dev/zero", odd / COMPLETE)
    assert latest_checkpoint(tmp_path) == (2, good)
    assert notes(caplog) == [f"ignoring checkpoint {odd}: its COMPLETE marker is not a regular file of at most "
                             "16 MiB; it counts as incomplete"]


def _saved(tmp_path: Path) -> tuple[Path, Path]:
    """Two real checkpoints (steps 2 and 4) of a small model with an optimizer."""
    accelerator = Accelerator()
    model = torch.nn.Linear(8, 8)
    accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    extra = {"counters": {"images": 8, "skipped": [0, 0, 0], "nonfinite_steps": 0}}
    return (save_checkpoint(accelerator, tmp_path, 2, keep_last=3, extra=extra),
            save_checkpoint(accelerator, tmp_path, 4, keep_last=3, extra=extra))


def _edit_marker(path: Path, **changes) -> None:
    marker = json.loads((path / COMPLETE).read_text())
    marker.update(changes)
    (path / COMPLETE).write_text(json.dumps(marker))


def _flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {  # what is done to the step-4 checkpoint → the note's reason
    "edited step": (lambda p: _edit_marker(p, step=999), "its COMPLETE marker was edited or is from another version "
                    "(its digest does not match)"),
    "malformed counters": (lambda p: _edit_marker(p, counters={"images": "many"}), "its COMPLETE marker was edited "
                           "or is from another version (its digest does not match)"),
    "copied to another step": (lambda p: shutil.copytree(p, p.parent / "step_00000006"), "its COMPLETE marker says "
                               "step 4, its directory step_00000006"),
    "truncated rng": (lambda p: (p / "random_states_0.pkl").write_bytes((p / "random_states_0.pkl").read_bytes()[:9]),
                      "random_states_0.pkl has 9 bytes, its COMPLETE marker says {size}"),
    "deleted rng": (lambda p: (p / "random_states_0.pkl").unlink(), "random_states_0.pkl is missing"),
    "changed weights": (lambda p: _flip_a_byte(p / "model.safetensors"), "model.safetensors does not match the "
                        "SHA-256 its COMPLETE marker holds"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_checkpoint_its_marker_does_not_vouch_for_is_skipped_naming_the_file(tmp_path, caplog, damage):
    """Edited markers, a step that is not the directory's, files cut short, deleted or changed: the checkpoint is
    incomplete, and the resume falls back on the one before with one note naming what is wrong."""
    older, newest = _saved(tmp_path)
    do, reason = DAMAGE[damage]
    size = (newest / "random_states_0.pkl").stat().st_size
    do(newest)
    copied = damage == "copied to another step"  # step_00000006 is the damaged one; step 4 itself is whole
    assert latest_checkpoint(tmp_path) == ((4, newest) if copied else (2, older))
    damaged = tmp_path / "checkpoints" / "step_00000006" if copied else newest
    assert notes(caplog)[-1] == f"ignoring checkpoint {damaged}: {reason.format(size=size)}; it counts as incomplete"


def test_a_whole_checkpoint_passes_and_its_marker_vouches_for_every_file(tmp_path, caplog):
    older, newest = _saved(tmp_path)
    assert latest_checkpoint(tmp_path) == (4, newest) and notes(caplog) == []
    marker = json.loads((newest / COMPLETE).read_text())
    assert sorted(marker["files"]) == sorted(p.name for p in newest.iterdir() if p.name != COMPLETE)
    assert marker["step"] == 4 and marker["counters"]["images"] == 8


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


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1088 vs 1026"),
    OSError(28, "No space left on device"),
])
def test_a_full_disk_during_a_save_is_enospc_naming_the_checkpoint_and_leaves_no_debris(tmp_path, monkeypatch, error):
    accelerator = Accelerator()
    accelerator.prepare(torch.nn.Linear(2, 2))
    older = save_checkpoint(accelerator, tmp_path, step=2, keep_last=1)
    before = {p.name: p.read_bytes() for p in older.iterdir()}

    def fills_the_disk(output_dir, *args, **kwargs):
        (Path(output_dir) / "model.safetensors").write_bytes(b"cut")
        raise error

    monkeypatch.setattr(accelerator, "save_state", fills_the_disk)
    with pytest.raises(OSError) as raised:
        save_checkpoint(accelerator, tmp_path, step=4, keep_last=1)
    assert (raised.value.errno, raised.value.strerror, raised.value.filename) == (
        28, "No space left on device", str(tmp_path / "checkpoints" / "step_00000004"))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000002"]
    assert {p.name: p.read_bytes() for p in older.iterdir()} == before


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
