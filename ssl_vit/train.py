"""The one pretraining loop. It runs any `Objective` and never asks which one.

Step-based: every schedule is a function of the optimizer step, checkpoints are taken every N steps, and
re-running the same command resumes from the newest complete checkpoint.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from ssl_vit.backbone import backbone_kwargs, build_backbone
from ssl_vit.checkpoint import export_backbone, latest_checkpoint, load_checkpoint, save_checkpoint
from ssl_vit.config import Config, dump_config
from ssl_vit.data.shards import SKIP_REASONS, train_stream
from ssl_vit.distributed import make_accelerator
from ssl_vit.objectives import Objective, build_objective
from ssl_vit.run_log import RunLog
from ssl_vit.schedules import cosine, warmup_cosine


@dataclass
class PretrainResult:
    run_dir: Path
    step: int  # optimizer steps done in total (this run and the ones it resumed)
    backbone: Path | None  # exported backbone.safetensors, when exported


def peak_lr(cfg: Config, num_processes: int) -> float:
    """The linear scaling rule: lr = base_lr × global batch / 256, unless an absolute lr is given."""
    if cfg.optim.lr is not None:
        return cfg.optim.lr
    return cfg.optim.base_lr * cfg.data.batch_size * num_processes * cfg.optim.accum_steps / 256


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _batch_images(batch: dict[str, Any]) -> int:
    images = batch["image"]
    return (images[0] if isinstance(images, (list, tuple)) else images).shape[0]


def build_optimizer(objective: Objective, cfg: Config, use_fused: bool) -> torch.optim.AdamW:
    groups = objective.param_groups(cfg.optim.weight_decay)
    # lr is set from the schedule before every step; the value here is a placeholder.
    return torch.optim.AdamW(groups, lr=0.0, betas=cfg.optim.betas, fused=use_fused or None)


def pretrain(cfg: Config, accelerator: Accelerator | None = None) -> PretrainResult:
    """Train `cfg.objective` on `cfg.data.train`, resuming from the newest checkpoint in `cfg.train.run_dir`."""
    accelerator = accelerator or make_accelerator(cfg.train.precision)
    run_dir = Path(cfg.train.run_dir)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
    # Same seed everywhere so every rank builds identical weights; ranks diverge (masks, data) only below.
    set_seed(cfg.train.seed)
    objective = build_objective(cfg.objective, getattr(cfg, cfg.objective), build_backbone(cfg.model))
    optimizer = build_optimizer(objective, cfg, use_fused=accelerator.device.type == "cuda")
    model, optimizer = accelerator.prepare(objective, optimizer)
    objective = accelerator.unwrap_model(model)
    set_seed(cfg.train.seed + accelerator.process_index)

    start = 0
    found = latest_checkpoint(run_dir)
    if found is not None:
        start = load_checkpoint(accelerator, found[1])
        accelerator.print(f"resumed from {found[1]} (step {start})")

    total, lr_peak = cfg.train.total_steps, peak_lr(cfg, accelerator.num_processes)
    log = RunLog(run_dir, enabled=accelerator.is_main_process, purge_step=start)
    # Deliberately not passed to accelerator.prepare: the stream already splits by rank and worker itself.
    loader = iter(train_stream(cfg.data, objective.views, rank=accelerator.process_index,
                               world_size=accelerator.num_processes, seed=cfg.train.seed, start_step=start))
    bar = tqdm(total=total, initial=start, desc="pretrain", disable=not accelerator.is_main_process,
               dynamic_ncols=True)
    window: dict[str, float] = {"loss": 0.0, "steps": 0, "wait": 0.0, "time": 0.0, "images": 0}
    skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long, device=accelerator.device)
    accum = cfg.optim.accum_steps
    step = start
    model.train()
    wd_end = cfg.optim.weight_decay if cfg.optim.weight_decay_end is None else cfg.optim.weight_decay_end
    while step < total:
        t_start = time.perf_counter()
        lr = warmup_cosine(step, total, cfg.train.warmup_steps, lr_peak, cfg.optim.min_lr)
        wd = cosine(step, total, cfg.optim.weight_decay, wd_end)
        for group in optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd if group["apply_wd"] else 0.0
        wait = 0.0
        for micro in range(accum):
            t_wait = time.perf_counter()
            batch = _to_device(next(loader), accelerator.device)
            wait += time.perf_counter() - t_wait
            skipped += batch["skipped"].sum(0)
            window["images"] += _batch_images(batch)
            # Gradients are all-reduced on the last micro-batch only.
            sync = accelerator.no_sync(model) if micro < accum - 1 else nullcontext()
            with sync, accelerator.autocast():
                out = model(batch, step)
                accelerator.backward(out["loss"] / accum)
            window["loss"] += out["loss"].detach().float().item() / accum
        grad_norm = None
        if cfg.optim.clip_grad is not None:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        objective.after_backward(step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        objective.after_step(step)
        step += 1
        bar.update(1)
        window["steps"] += 1
        window["wait"] += wait
        window["time"] += time.perf_counter() - t_start

        if step % cfg.train.log_every == 0 or step == total:
            scalars = _window_scalars(accelerator, window, skipped, out, lr, wd, grad_norm)
            log.scalars(step, scalars)
            bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", lr=f"{lr:.2e}")
            window = dict.fromkeys(window, 0.0)
        if cfg.train.image_every and (step % cfg.train.image_every == 0 or step == total):
            if accelerator.is_main_process:
                model.eval()
                for tag, image in objective.visualize(batch).items():
                    log.image(step, tag, image)
                model.train()
        if (cfg.train.save_every and step % cfg.train.save_every == 0) or step == total:
            path = save_checkpoint(accelerator, run_dir, step, cfg.train.keep_last)
            if accelerator.is_main_process:
                bar.write(f"checkpoint: {path}")
    bar.close()
    log.close()

    exported = None
    if cfg.train.export:
        if accelerator.is_main_process:
            exported = export_backbone(objective.export_backbone(), run_dir, cfg.model.name,
                                       backbone_kwargs(cfg.model), {"objective": cfg.objective, "step": step})
            accelerator.print(f"exported backbone: {exported}")
        accelerator.wait_for_everyone()
        exported = run_dir / "backbone.safetensors"
    return PretrainResult(run_dir=run_dir, step=step, backbone=exported)


def _window_scalars(accelerator: Accelerator, window: dict[str, float], skipped: torch.Tensor,
                    out: dict[str, torch.Tensor], lr: float, wd: float,
                    grad_norm: torch.Tensor | None) -> dict[str, float]:
    """Scalars averaged over the steps since the last log, reduced across ranks (a collective: all ranks call)."""
    steps = max(window["steps"], 1)
    local = torch.tensor([window["loss"] / steps, window["images"], window["wait"], window["time"]],
                         device=accelerator.device, dtype=torch.float64)
    mean = accelerator.reduce(local.clone(), reduction="mean")
    total_skipped = accelerator.reduce(skipped.clone(), reduction="sum")
    images_global = float(mean[1]) * accelerator.num_processes
    scalars = {
        "train/loss": float(mean[0]),
        "train/lr": lr,
        "train/weight_decay": wd,
        "perf/images_per_s": images_global / max(float(mean[3]), 1e-9),
        "perf/data_wait_share": float(mean[2]) / max(float(mean[3]), 1e-9),
        "perf/step_time_s": float(mean[3]) / steps,
    }
    for name, value in out.items():
        if name != "loss" and value.numel() == 1:
            scalars[f"train/{name}"] = float(accelerator.reduce(value.detach().float(), reduction="mean"))
    if grad_norm is not None:
        scalars["train/grad_norm"] = float(grad_norm)
    for reason, count in zip(SKIP_REASONS, total_skipped.tolist(), strict=True):
        scalars[f"data/skipped_{reason}"] = float(count)
    return scalars


def resolve_demo(cfg: Config) -> Config:
    """With no training shards configured, train on the built-in demo data (generated once, then cached) and,
    unless k-NN shards are given, evaluate on its labelled splits."""
    if cfg.data.train:
        return cfg
    from ssl_vit.data.demo import ensure_demo_data

    demo = ensure_demo_data()
    ev = cfg.eval
    if not ev.knn_train and not ev.knn_val:
        ev = dataclasses.replace(ev, knn_train=demo.knn_train, knn_val=demo.knn_val)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=demo.train), eval=ev)
