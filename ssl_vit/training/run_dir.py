"""What a run directory holds, checked before a run writes into it: nothing is overwritten unasked, a resume with
another model is refused, and one with changed settings names them and keeps the old config (docs/design.md)."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list

from ssl_vit.config.pretrain import Config, load_config
from ssl_vit.config.schema import ConfigError, differences
from ssl_vit.models.backbone import build_backbone
from ssl_vit.training.checkpoint import model_mismatch

if TYPE_CHECKING:
    from ssl_vit.methods import Objective

PRETRAINING, FINETUNING = "pretraining", "fine-tuning"
LOCK = ".lock"


@contextmanager
def hold_run_dir(run_dir: Path, accelerator: Accelerator) -> Iterator[None]:
    """One run at a time in `run_dir`: the main process's flock on `run_dir/.lock`, which the OS releases however
    the process ends (a killed run's lock never blocks); a second run is refused on every rank, naming its pid."""
    fd, holder, created = None, None, not run_dir.exists()
    if accelerator.is_main_process:
        if not created and not run_dir.is_dir():
            raise ValueError(f"train.run_dir {run_dir} is a file, not a directory; set another train.run_dir")
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    if accelerator.num_processes > 1:
        holder = broadcast_object_list([holder])[0]
    if holder is not None:
        raise ValueError(f"train.run_dir {run_dir} is in use by another run (pid {holder}); wait for it to end or "
                         "set another train.run_dir")
    try:
        yield
    except BaseException:
        if fd is not None and created and [p.name for p in run_dir.iterdir()] == [LOCK]:
            (run_dir / LOCK).unlink()  # a run that failed before writing anything leaves no run dir either
            run_dir.rmdir()
        raise
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def run_kind(run_dir: Path) -> str | None:
    """PRETRAINING, FINETUNING or "unknown" by `run_dir`'s config.yaml; None without one."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        data: Any = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return "unknown"
    if not isinstance(data, dict):
        return "unknown"
    if "objective" in data:
        return PRETRAINING
    model = data.get("model")
    return FINETUNING if isinstance(model, dict) and "backbone" in model else "unknown"


# What a finished run leaves that its checkpoints cannot make again once they are gone.
_RESULTS = {PRETRAINING: ("backbone.safetensors",), FINETUNING: ("best", "finetune.json")}


def check_run_dir(run_dir: Path, kind: str, resuming: bool) -> None:
    """Refuse a `run_dir` that is a file or holds another kind of run, or a new run (not `resuming`) that would
    overwrite an earlier result."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"train.run_dir {run_dir} is a file, not a directory; set another train.run_dir")
    if (run_dir / "checkpoints").exists() and not (run_dir / "checkpoints").is_dir():  # else it fails at the save
        raise ValueError(f"train.run_dir {run_dir} holds a file named checkpoints, where the run saves its "
                         "checkpoints; move it away or set another train.run_dir")
    found = run_kind(run_dir)
    if found not in (None, kind):
        what = f"a {found} run" if found != "unknown" else "a config.yaml that is no run's config"
        raise ValueError(f"train.run_dir {run_dir} holds {what}, not a {kind} run's; set a new train.run_dir")
    held = [] if resuming else [name for name in _RESULTS[kind] if (run_dir / name).exists()]
    if held:
        what = f"a fine-tuning result ({', '.join(held)})" if kind == FINETUNING else "an exported " + held[0]
        raise ValueError(f"train.run_dir {run_dir} holds {what} but no checkpoint to resume from: a new run would "
                         "overwrite it; set a new train.run_dir (or delete it)")


def keep_changed_config(run_dir: Path, cfg: Any, step: int, load: Callable[[Path], Any] | None = None) -> str | None:
    """On a resume at `step` where `cfg` differs from the run's config.yaml (read with `load`, by default
    pretraining's), keep that file as `config.before_step_<step>.yaml` and return a notice naming the changes."""
    path = run_dir / "config.yaml"
    try:
        saved = (load or load_config)(path)
    except (ConfigError, OSError, ValueError):
        return None
    changed = [line for line in differences(saved, cfg) if not line.startswith("train.run_dir:")]  # a moved run
    if not changed:
        return None
    kept = run_dir / f"config.before_step_{step:08d}.yaml"
    shutil.copyfile(path, kept)
    shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
    return (f"resuming with settings that differ from the run's config.yaml ({shown}): a resume repeats the "
            f"uninterrupted run only with the same settings; the old config is kept as {kept.name}")


def check_resume_model(objective: Objective, cfg: Config, path: Path, sharded: bool = False) -> None:
    """Refuse, in one line naming what differs from the run's config.yaml, to resume from `path` with another
    architecture: by tensor shapes (not for `sharded` FSDP state, which Accelerate checks), and by the keys that
    change a model but no shape."""
    try:
        saved: Config | None = load_config(Path(cfg.train.run_dir) / "config.yaml")
    except (ConfigError, OSError):
        saved = None
    shapes = None if sharded else model_mismatch(objective, path)
    if shapes is not None:  # name the keys that changed since the run's config.yaml, when it can be read
        changed = [] if saved is None else differences(saved, cfg, ("objective", "model.", f"{cfg.objective}."))
        why = (f"{', '.join(changed)} since the run's config.yaml; " if changed else "") + shapes
    elif saved is not None and (same_shapes := shapeless_changes(saved, cfg)):
        why = f"{', '.join(same_shapes)} since the run's config.yaml"
    else:
        return
    raise ValueError(f"checkpoint {path} was made with a different model config ({why}); resume with the run's "
                     "own config, or set a new train.run_dir")


# Keys that change a model but no shape, so `model_mismatch` cannot see them (value: the objective they apply to),
# and the backbone's lr scales: the optimizer's groups and their scales are restored from the checkpoint.
_SHAPELESS = {"model.name": None, "model.num_heads": None, "mae.decoder_heads": "mae", "dino.norm_last_layer": "dino",
              "dinov2.norm_last_layer": "dinov2", "optim.backbone_lr_scale": None, "optim.layer_decay": None}


def shapeless_changes(saved: Config, cfg: Config) -> list[str]:
    """`key old → new` for each of those keys that differ (heads as built: null is the timm model's own)."""
    changed = []
    for key, objective in _SHAPELESS.items():
        section, name = key.split(".")
        old, new = getattr(getattr(saved, section), name), getattr(getattr(cfg, section), name)
        if objective not in (None, cfg.objective) or old == new:
            continue
        if key != "model.num_heads" or _heads(saved) != _heads(cfg):
            changed.append(f"{key} {old} → {new}")
    return changed


def _heads(cfg: Config) -> list[int]:
    try:
        with torch.device("meta"):  # the structure without allocating or initialising any weight
            vit = build_backbone(cfg.model)
    except ValueError:  # older timm (1.0.16 at least) calls .item() while building, which meta tensors refuse
        vit = build_backbone(cfg.model)
    return [block.attn.num_heads for block in vit.blocks]


def process_count_notice(cfg: Config, checkpoint: Path, processes: int) -> str | None:
    """A line when a resume runs on fewer processes than the checkpoint was saved by (more are refused): the
    global batch shrinks, and the lr with it. No config key holds the count, so `keep_changed_config` cannot."""
    saved = len(list(checkpoint.glob("random_states_*.pkl")))
    if saved in (0, processes):
        return None
    batch = cfg.data.batch_size * cfg.optim.accum_steps
    lr = "" if cfg.optim.lr is not None else ", and the peak lr (optim.base_lr × global batch / 256) with it"
    return (f"note: {checkpoint.name} was saved by {saved} processes, this run has {processes}: global batch "
            f"{batch * saved} → {batch * processes}{lr}; raise optim.accum_steps to keep them")
