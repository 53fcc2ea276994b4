"""`model.init`: the weights a pretraining run starts from (a timm weights file, a Hugging Face hub id, an ssl_vit
export or another run's checkpoint), read into a timm state dict and loaded by one strict function into every copy
of the backbone (docs/adapt.md)."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

from safetensors import SafetensorError
from timm.models import load_state_dict
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import Tensor, nn

from ssl_vit.config.pretrain import ModelConfig
from ssl_vit.training.checkpoint import latest_checkpoint, load_backbone, load_run_objective
from ssl_vit.training.marker import COMPLETE, PREFIX

HUB = "hf-hub:"
TIMM_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")

State = dict[str, Tensor]


def init_objective(objective: nn.Module, cfg: ModelConfig) -> str:
    """Load `cfg.init` into every timm ViT of the freshly built `objective` (the student's backbone and a DINO
    teacher's copies of it; or a lone backbone) and return the line that says so. After the objective is built,
    not before: MAE and DINO re-initialise parts of the backbone they are handed (sin-cos positions, cls token)."""
    vits = [m for m in objective.modules() if isinstance(m, VisionTransformer)]
    state, what = read_init(cfg.init)
    fitted, note = fit_state(state, vits[0], cfg)
    for vit in vits:  # copies of one architecture: what fits the first fits all
        vit.load_state_dict(fitted, strict=cfg.init_strict)
    return f"model.init: loaded {len(fitted)} tensors from {what}{note}"


def read_init(spec: str) -> tuple[State, str]:
    """The state dict `spec` names, and what it is in a few words. `hf-hub:org/name` is a hub id; anything else is
    a path, its form decided by what is there (run dir, export, checkpoint, timm weights file)."""
    if spec.startswith(HUB):
        return _from_hub(spec.removeprefix(HUB))
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "backbone.safetensors").is_file():
            return _from_export(path / "backbone.safetensors")
        if path.name.startswith(PREFIX) and (path / COMPLETE).exists():
            return _from_checkpoint(path)
        found = latest_checkpoint(path)
        if found is None:
            raise ValueError(f"model.init: {path} holds neither backbone.safetensors nor a complete checkpoint "
                             f"(checkpoints/{PREFIX}N)")
        return _from_checkpoint(found[1])
    if path.is_file():
        if path.suffix == ".safetensors" and path.with_suffix(".json").is_file():
            return _from_export(path)
        if path.name == "model.safetensors" and path.parent.name.startswith(PREFIX):
            return _from_checkpoint(path.parent)
        if path.suffix in TIMM_SUFFIXES:
            return _from_timm_file(path), f"{path} (timm weights)"
        raise ValueError(f"model.init: {path} is no weights file ({', '.join(TIMM_SUFFIXES)})")
    raise ValueError(f"model.init: {spec} is no file or directory (nor an {HUB}org/name id)")


def _first_line(err: BaseException) -> str:
    line = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {line.split('. ')[0][:160]}"


def _from_hub(repo: str) -> tuple[State, str]:
    """The files timm's hub path reads (`model.safetensors`, else `pytorch_model.bin`), fetched by huggingface_hub
    itself: from the local cache alone under HF_HUB_OFFLINE=1. Not through timm: timm 1.0.16's hub module does not
    import with huggingface_hub >= 1.0."""
    from huggingface_hub import constants, hf_hub_download  # timm depends on huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError

    repo_id, _, revision = repo.partition("@")  # timm's org/name@revision
    missing: Exception | None = None
    for filename in ("model.safetensors", "pytorch_model.bin"):
        try:
            path = Path(hf_hub_download(repo_id, filename, revision=revision or None))
        except EntryNotFoundError as err:  # in neither the repo nor (offline) the cache: try the next file
            missing = err
            continue
        except (OSError, ValueError) as err:  # no such repo, no network, offline without it in the cache
            raise ValueError(f"model.init: {HUB}{repo} does not load ({_first_line(err)})") from None
        return _from_timm_file(path), f"{HUB}{repo} ({path.name} in the Hugging Face cache)"
    offline = "; HF_HUB_OFFLINE is set: only the local cache is read" if constants.HF_HUB_OFFLINE else ""
    raise ValueError(f"model.init: {HUB}{repo}: neither model.safetensors nor pytorch_model.bin could be read "
                     f"({_first_line(missing)}){offline}")


def _from_timm_file(path: Path) -> State:
    """As timm reads a `pretrained_cfg_overlay=dict(file=...)`: safetensors, or a pickle as plain tensors only; a
    "model" or "state_dict" wrapper is unwrapped (its EMA weights preferred) and a "module." prefix dropped."""
    try:
        return load_state_dict(str(path), weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError, pickle.UnpicklingError, SafetensorError) as err:
        raise ValueError(f"model.init: {path} does not load ({_first_line(err)})") from None


def _from_export(weights: Path) -> tuple[State, str]:
    try:  # the export loader checks the file against its backbone.json
        model, meta = load_backbone(weights)
    except (OSError, ValueError) as err:
        raise ValueError(f"model.init: {err}") from None
    made = ", ".join([str(meta["objective"])] * ("objective" in meta) + [f"step {meta['step']}"] * ("step" in meta))
    return model.state_dict(), f"{weights} (ssl_vit export{': ' + made if made else ''})"


def _from_checkpoint(path: Path) -> tuple[State, str]:
    """The backbone a checkpoint's export would give (`export_run`: a DINO teacher's with `export_teacher`), built
    from its run's config.yaml; the checkpoint must be complete and match its checksums."""
    try:
        objective, step = load_run_objective(path.parent.parent, path)
    except (OSError, ValueError) as err:  # ConfigError is a ValueError
        raise ValueError(f"model.init: {err}") from None
    exported = objective.export_backbone()
    name = next(name for name, module in objective.named_modules() if module is exported)
    kind = type(objective).__name__
    return exported.state_dict(), f"{path} (checkpoint of a {kind} run at step {step}: its {name})"


def fit_state(state: State, model: VisionTransformer, cfg: ModelConfig) -> tuple[State, str]:
    """`state` (of `cfg.init`) in `model`'s names and shapes as timm's loader makes it (positions and patch
    embedding resampled, a classifier dropped), and a note on what was resampled; any other difference: one line."""
    regs = state.get("reg_token", state.get("register_tokens"))  # timm's name, DINOv2's
    n_regs = 0 if regs is None else regs.shape[1]
    if n_regs != model.num_reg_tokens:
        fix = (f"set model.reg_tokens={n_regs} (or a model.name with them)" if n_regs else
               "use a model.name without them (model.reg_tokens 0 keeps the timm model's own)")
        raise ValueError(f"model.init: {cfg.init} has {n_regs} register tokens, this run's model "
                         f"{model.num_reg_tokens}: {fix}")
    note, theirs, ours = "", state.get("pos_embed"), model.pos_embed
    # timm's filter drops the cls position of an original DINOv2 file with registers (timm's are no_embed_class)
    n_theirs = None if theirs is None else theirs.shape[1] - ("register_tokens" in state)
    resampled = n_theirs is not None and ours is not None and n_theirs != ours.shape[1]
    if resampled:
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens  # what timm's filter assumes of the file
        side, grid = math.isqrt(max(n_theirs - prefix, 0)), model.patch_embed.grid_size
        since = f" from {side}x{side}" if side * side == n_theirs - prefix else ""
        note = f"; pos_embed resampled{since} to {grid[0]}x{grid[1]} patches"
    kernel, ours_kernel = state.get("patch_embed.proj.weight"), model.patch_embed.proj.weight
    if kernel is not None and kernel.ndim == 4 and kernel.shape[-2:] != ours_kernel.shape[-2:]:
        note += (f"; patch_embed resampled from {kernel.shape[-2]}x{kernel.shape[-1]} to "
                 f"{ours_kernel.shape[-2]}x{ours_kernel.shape[-1]} pixels")
    try:
        state = checkpoint_filter_fn(dict(state), model)
    except (RuntimeError, ValueError) as err:
        why = (f"; its pos_embed has {n_theirs} positions, {cfg.name}'s {ours.shape[1]}: the file positions its cls "
               "and register tokens otherwise, use the model.name it was saved from") if resampled else ""
        raise ValueError(f"model.init: {cfg.init} does not convert to {cfg.name} ({_first_line(err)}){why}") from None
    ours_state = model.state_dict()
    # The run's backbone is headless: a classifier in the file is dropped, as timm drops it for num_classes=0.
    state = {k: v for k, v in state.items() if k in ours_state or not k.startswith("head.")}
    problem = _difference(state, ours_state)
    if problem and cfg.init_strict:
        raise ValueError(f"model.init: {cfg.init} does not fit {cfg.name} (embed_dim {model.embed_dim}, depth "
                         f"{len(model.blocks)}): {problem}")
    if problem:  # model.init_strict false: what fits loads, the rest of the model keeps its fresh init
        state = {k: v for k, v in state.items() if k in ours_state and v.shape == ours_state[k].shape}
        note += f"; not loaded (model.init_strict false): {problem}"
    return state, note


def _difference(theirs: State, ours: State) -> str | None:
    """The keys in one state and not the other, and the shapes that differ, the first of each named."""
    def first(keys: list[str], say: str) -> str:
        more = f" (and {len(keys) - 1} more)" if len(keys) > 1 else ""
        return f"{keys[0]} {say}{more}"

    parts = []
    if extra := [k for k in theirs if k not in ours]:
        hint = ("; the file has LayerScale: set model.layer_scale_init (any value: the file's gains replace it)"
                if any(".ls1.gamma" in k or ".ls2.gamma" in k for k in extra) else "")
        parts.append(first(extra, "is in the file, not in the model") + hint)
    if missing := [k for k in ours if k not in theirs]:
        hint = ("; the file has no LayerScale: leave model.layer_scale_init null"
                if any(".ls1.gamma" in k or ".ls2.gamma" in k for k in missing) else "")
        parts.append(first(missing, "is in the model, not in the file") + hint)
    if shapes := [k for k in ours if k in theirs and theirs[k].shape != ours[k].shape]:
        k = shapes[0]
        parts.append(first(shapes, f"is {list(theirs[k].shape)} in the file, {list(ours[k].shape)} in the model"))
    return "; ".join(parts) or None
