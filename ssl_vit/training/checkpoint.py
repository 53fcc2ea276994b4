"""Resume state (accelerate's save_state under checkpoints/step_<step>/ + a COMPLETE marker), backbone export
(backbone.safetensors + backbone.json, loadable with plain timm) and the one backbone loader (docs/design.md)."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from accelerate.utils.other import load as safe_load  # torch.load(weights_only=True) + numpy RNG types
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer

from ssl_vit.config.pretrain import load_config
from ssl_vit.models.backbone import backbone_kwargs, build_backbone
from ssl_vit.training.marker import COMPLETE, PREFIX, read_marker, write_marker

if TYPE_CHECKING:
    from ssl_vit.methods import Objective

log = logging.getLogger(__name__)


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint whose save finished and whose files are all there at the sizes its marker
    records, oldest first. Half-written ones are ignored; damaged ones with a note naming what is wrong."""
    found = []
    for marker in (Path(run_dir) / "checkpoints").glob(f"{PREFIX}*/{COMPLETE}"):  # written last, atomically
        content, problem = read_marker(marker.parent)
        if content is None:
            log.warning(f"ignoring checkpoint {marker.parent}: {problem}; it counts as incomplete")
        else:
            found.append((content["step"], marker.parent))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path, accelerator: Accelerator | None = None) -> tuple[int, Path] | None:
    """The newest complete checkpoint whose files also match their checksums (a newer one that does not is skipped
    with a note naming the file); with an `accelerator`, the main process reads them and tells the other ranks."""
    if accelerator is not None and accelerator.num_processes > 1:
        found = latest_checkpoint(run_dir) if accelerator.is_main_process else None
        return broadcast_object_list([found])[0]
    for step, path in reversed(complete_checkpoints(run_dir)):
        _, problem = read_marker(path, checksums=True)
        if problem is None:
            return step, path
        log.warning(f"ignoring checkpoint {path}: {problem}; it counts as incomplete")
    return None


def save_checkpoint(accelerator: Accelerator, run_dir: str | Path, step: int, keep_last: int,
                    extra: dict[str, Any] | None = None) -> Path:
    """Save model, optimizer, scaler and per-rank RNG (every rank calls this); atomic: temp dir → COMPLETE marker
    (the step, `extra` as JSON, each file's size and checksum) → rename. A failed save (a full disk) removes the
    temp dir on every rank's word and leaves the older checkpoints as they were."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".tmp_{PREFIX}{step:08d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that was killed
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    failure = _attempt(lambda: accelerator.save_state(str(tmp)))
    if not _failed_anywhere(accelerator, failure) and accelerator.is_main_process:
        failure = _attempt(lambda: _seal(tmp, final, step, extra))
    if _failed_anywhere(accelerator, failure):  # every rank learns of it: none may wait for the others forever
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(failure, final)
    if accelerator.is_main_process:
        for _, old in complete_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else ():
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _seal(tmp: Path, final: Path, step: int, extra: dict[str, Any] | None) -> None:
    write_marker(tmp, step, extra)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def _attempt(action: Callable[[], object]) -> Exception | None:
    try:
        action()
    except Exception as err:  # handed to _save_error once every rank knows
        return err
    return None


def _failed_anywhere(accelerator: Accelerator, failure: Exception | None) -> bool:
    flag = torch.tensor([float(failure is not None)], device=accelerator.device)
    return bool(accelerator.reduce(flag, "sum").item() > 0)


# How a full disk shows through torch's zip writer and safetensors, which do not raise OSError.
_DISK_FULL = ("No space left", "os error 28", "unexpected pos", "file write failed")


def _save_error(failure: Exception | None, path: Path) -> Exception:
    """A full disk as `OSError(ENOSPC)` naming `path` (one line from the CLI); other failures as they were."""
    if failure is None:
        return OSError(f"another process failed to save checkpoint {path}; its error is in that process's output")
    if (isinstance(failure, OSError) and failure.errno in (errno.ENOSPC, errno.EDQUOT)) or (
            isinstance(failure, (RuntimeError, SafetensorError)) and any(s in str(failure) for s in _DISK_FULL)):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return failure


def load_checkpoint(accelerator: Accelerator, path: Path) -> dict[str, Any]:
    """Restore everything `save_checkpoint` wrote; returns the marker: {"step": ..., **extra}. Every rank checks
    every rank's RNG file, so that all refuse together; pickles load with `weights_only=True` (docs/design.md)."""
    missing = [i for i in range(accelerator.num_processes) if not (path / f"random_states_{i}.pkl").is_file()]
    if missing:  # saved by fewer processes than this run has: not a damaged checkpoint
        saved = len(list(path.glob("random_states_*.pkl")))
        raise ValueError(f"checkpoint {path} holds the RNG states of {saved} process(es), none for process "
                         f"{missing[0]}: resume with the number of processes it was saved by")
    try:
        with reading(path):
            accelerator.load_state(str(path))
            safe_load(path / f"random_states_{accelerator.process_index}.pkl")  # load_state logs a failure only
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0][:120]
        raise ValueError(f"checkpoint {path}: refusing a file that is not plain tensors ({first}); "
                         "delete this checkpoint to resume from an older one") from None
    return json.loads((path / COMPLETE).read_text())


@contextmanager
def reading(path: Path) -> Iterator[None]:
    """A checkpoint file cut short, garbled or gone becomes one line naming the older checkpoint to fall back on;
    other failures (out of memory, say) pass through."""
    try:
        yield
    except (SafetensorError, EOFError, FileNotFoundError, RuntimeError) as err:
        # torch.load of a cut zip says "PytorchStreamReader failed reading zip archive"
        signs = ("PytorchStreamReader", "zip archive", "unexpected pos")
        if isinstance(err, RuntimeError) and not any(sign in str(err) for sign in signs):
            raise
        first = (str(err).strip().splitlines() or [""])[0][:160]
        older = [p for s, p in complete_checkpoints(path.parent.parent) if s < int(path.name.removeprefix(PREFIX))]
        fallback = f"delete it to fall back on {older[-1].name}" if older else "delete it to start afresh"
        raise ValueError(f"checkpoint {path} does not load ({type(err).__name__}: {first}); if it is damaged, "
                         f"{fallback}") from None


def export_backbone(vit: VisionTransformer | dict[str, torch.Tensor], out_dir: str | Path, model_name: str,
                    model_kwargs: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write `backbone.safetensors` + `backbone.json`, loadable with plain timm (see docs/export.md); `vit`: the
    backbone or its state dict (gathered under FSDP: training/gather.py)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / "backbone.safetensors"
    tensors = vit.state_dict() if isinstance(vit, torch.nn.Module) else vit
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    save_shared(state, weights, metadata={"format": "pt"})
    meta = {"model_name": model_name, "model_kwargs": model_kwargs, **(extra or {})}
    (out_dir / "backbone.json").write_text(json.dumps(meta, indent=2) + "\n")
    return weights


def save_shared(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file` (which creates files 0600), then the mode of any new file: exports are shared."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except (OSError, SafetensorError) as err:
        raise _save_error(err, path) from None
    path.chmod(0o666 & ~_umask())


def _umask() -> int:
    try:  # Linux ≥ 4.7 shows it; reading it elsewhere means setting it, racing threads that create files meanwhile
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("Umask:")), 8)
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def model_mismatch(model: torch.nn.Module, path: Path) -> str | None:
    """The first tensor in which `model` and the checkpoint at `path` differ (name or shape), or None; from the
    safetensors header only. None without a `model.safetensors` (sharded FSDP state: Accelerate checks that)."""
    weights = path / "model.safetensors"
    if not weights.is_file():
        return None
    with reading(path), safe_open(str(weights), "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return shape_mismatch(model, saved, "the checkpoint")


def shape_mismatch(model: torch.nn.Module, saved: dict[str, tuple[int, ...]], where: str) -> str | None:
    """The first tensor in which `model` and the `saved` shapes (of `where`: "the checkpoint") differ, or None."""
    state = model.state_dict()
    ours = {k: tuple(v.shape) for k, v in state.items()}
    # Tensors sharing memory (tied weights) are saved once, under one of their names: the others are not missing.
    saved_memory = {(state[k].data_ptr(), ours[k]) for k in saved.keys() & ours.keys()}
    for key in sorted(saved.keys() | ours.keys()):
        if key not in ours:
            return f"{key} is in {where}, not in this model"
        if key in saved and saved[key] != ours[key]:
            return f"{key} has shape {list(saved[key])} in {where}, {list(ours[key])} in this model"
        if key not in saved and (state[key].data_ptr(), ours[key]) not in saved_memory:
            return f"{key} is in this model, not in {where}"
    return None


def load_backbone(path: str | Path, random_init: bool = False) -> tuple[VisionTransformer, dict[str, Any]]:
    """Build the exported backbone (`path`: run dir or .safetensors) with timm and load its weights strictly;
    `random_init=True` builds the same architecture untrained, the baseline every evaluation compares with."""
    path = Path(path)
    weights = path / "backbone.safetensors" if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(f"no backbone weights at {weights}")
    if weights.suffix in (".pth", ".pt", ".bin", ".ckpt", ".pkl", ".pickle"):
        raise ValueError(f"{weights}: backbones load from .safetensors only (no pickled checkpoints)")
    if weights.suffix != ".safetensors":
        raise ValueError(f"{weights}: not a backbone; give a run directory or its backbone.safetensors")
    meta_path = weights.with_suffix(".json")
    if not meta_path.is_file():
        if weights.name == "model.safetensors" and weights.parent.name.startswith(PREFIX):
            raise FileNotFoundError(f"{weights} is a training checkpoint, not an exported backbone; export it with "
                                    f"`ssl-vit export {weights.parent.parent.parent}` and use that run directory")
        raise FileNotFoundError(f"{weights}: missing {meta_path.name} beside it (timm model name and kwargs)")
    try:
        meta = json.loads(meta_path.read_text())
        name, kwargs = meta["model_name"], dict(meta["model_kwargs"])
    except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
        raise ValueError(f"{meta_path}: not a backbone description ({type(err).__name__}: {err})") from None
    model = timm.create_model(name, pretrained=False, **kwargs)
    if not random_init:
        try:
            state = load_file(str(weights))
        except (SafetensorError, EOFError, RuntimeError) as err:
            raise ValueError(f"{weights} does not load ({type(err).__name__}: {err})") from None
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError:  # torch lists every tensor that differs: name the first
            first = shape_mismatch(model, {k: tuple(v.shape) for k, v in state.items()}, "the weights")
            raise ValueError(f"{weights} does not fit the model {meta_path.name} describes: {first}") from None
    return model, meta


def load_run_objective(run_dir: str | Path, checkpoint: Path | None = None) -> tuple[Objective, int]:
    """The objective (backbone + decoder/head/teacher) of a run's newest complete checkpoint, or of `checkpoint`
    (one of its step directories, checked against its checksums), and its step."""
    from ssl_vit.methods import build_objective  # imported here: the methods import this module

    if checkpoint is not None:
        marker, problem = read_marker(checkpoint, checksums=True)
        if marker is None:
            raise ValueError(f"checkpoint {checkpoint} is incomplete: {problem}")
        found = marker["step"], checkpoint
    elif (found := latest_checkpoint(run_dir)) is None:
        raise FileNotFoundError(f"no complete checkpoint under {Path(run_dir) / 'checkpoints'}")
    step, path = found
    cfg = load_config(Path(run_dir) / "config.yaml")
    objective = build_objective(cfg.objective, getattr(cfg, cfg.objective), build_backbone(cfg.model),
                                total_steps=cfg.train.total_steps)
    weights, full = path / "model.safetensors", path / "pytorch_model_fsdp.bin"  # full: FSDP's FULL_STATE_DICT
    if not weights.is_file() and not full.is_file():
        raise FileNotFoundError(f"checkpoint {path} holds no model.safetensors (an FSDP run with SHARDED_STATE_DICT "
                                "saves sharded weights, which export and visualize do not read: docs/distributed.md)")
    with reading(path):
        state = load_file(str(weights)) if weights.is_file() else safe_load(full, map_location="cpu")
    mismatch = shape_mismatch(objective, {k: tuple(v.shape) for k, v in state.items()}, "the checkpoint")
    if mismatch is not None:
        raise ValueError(f"checkpoint {path} does not fit {Path(run_dir) / 'config.yaml'}: {mismatch}")
    objective.load_state_dict(state, strict=True)
    return objective.eval(), step


def export_run(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Export the backbone of a run's newest complete checkpoint (e.g. of a run that was stopped early)."""
    objective, step = load_run_objective(run_dir)
    cfg = load_config(Path(run_dir) / "config.yaml")
    return export_backbone(objective.export_backbone(), out_dir or run_dir, cfg.model.name,
                           backbone_kwargs(cfg.model), {"objective": cfg.objective, "step": step})

