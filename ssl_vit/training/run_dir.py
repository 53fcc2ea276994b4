"""What a run directory already holds, checked before a run writes into it.

A run (pretraining or fine-tuning) resumes from its own checkpoints; apart from that, nothing a run directory
holds is overwritten unasked: not another kind of run, not an exported backbone or a best fine-tuned model whose
checkpoints are gone. On a resume, settings that changed since the run's config.yaml are named, and the old file
is kept beside the new one.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

PRETRAINING, FINETUNING = "pretraining", "fine-tuning"


def run_kind(run_dir: Path) -> str | None:
    """The kind of run whose config.yaml is in `run_dir` (PRETRAINING, FINETUNING, or "unknown" for a file that
    reads as neither), or None where there is none."""
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
    """Refuse a `run_dir` that is a file or holds another kind of run than `kind`; and to start a new run (not
    `resuming` from a checkpoint) where an earlier result (an exported backbone, a best model) would be overwritten."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"train.run_dir {run_dir} is a file, not a directory; set another train.run_dir")
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
    """On a resume at `step`: where `cfg` differs from the run's config.yaml (read with `load`, by default the
    pretraining config's loader), keep that file as `config.before_step_<step>.yaml` and return a one-line notice
    naming the changes; None if nothing changed. (The model is checked before this: only settings that keep it
    can differ here.)"""
    from ssl_vit.config.pretrain import load_config
    from ssl_vit.config.schema import ConfigError, differences

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
