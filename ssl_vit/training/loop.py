"""The one pretraining loop. It runs any `Objective` and never asks which one.

Step-based: every schedule is a function of the optimizer step, checkpoints are taken every N steps, and
re-running the same command resumes from the newest complete checkpoint. Guarantees (docs/troubleshooting.md):
- exact resume: the data stream is reseeded on a fixed grid of steps (every `train.save_every`), so a run
  resumed from a checkpoint reads the very batches the uninterrupted run reads;
- SIGTERM/SIGINT stop every rank after the same step, save, and return normally;
- a NaN/inf loss or gradient norm on any rank skips that update on all ranks; too many in a row abort;
- too many unusable samples abort with the counts by reason.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from ssl_vit.config.pretrain import Config, dump_config
from ssl_vit.data.batches import to_device, training_batches
from ssl_vit.data.shard_urls import resolve_shards
from ssl_vit.methods import Objective, build_objective
from ssl_vit.models.backbone import backbone_kwargs, build_backbone
from ssl_vit.training.checkpoint import (
    export_backbone,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from ssl_vit.training.distributed import check_fsdp_supported, make_accelerator
from ssl_vit.training.monitor import Counters, RunAborted, StepWindow
from ssl_vit.training.optim import cosine, warmup_cosine
from ssl_vit.training.resume import check_resume_model, process_count_notice
from ssl_vit.training.run_dir import check_new_pretraining_dir, keep_changed_config
from ssl_vit.training.run_log import RunLog
from ssl_vit.training.signals import StopRequest

__all__ = ["PretrainResult", "RunAborted", "peak_lr", "pretrain", "resolve_demo"]


@dataclass
class PretrainResult:
    run_dir: Path
    step: int  # optimizer steps done in total (this run and the ones it resumed)
    backbone: Path | None  # exported backbone.safetensors, when exported
    stopped_by: str | None = None  # signal name when a SIGTERM/SIGINT ended the run early
    checkpoint: Path | None = None  # the newest checkpoint written


def peak_lr(cfg: Config, num_processes: int) -> float:
    """The linear scaling rule: lr = base_lr × global batch / 256, unless an absolute lr is given."""
    if cfg.optim.lr is not None:
        return cfg.optim.lr
    return cfg.optim.base_lr * cfg.data.batch_size * num_processes * cfg.optim.accum_steps / 256


def build_optimizer(objective: Objective, cfg: Config, use_fused: bool) -> torch.optim.AdamW:
    groups = objective.param_groups(cfg.optim.weight_decay)
    # lr is set from the schedule before every step; the value here is a placeholder.
    return torch.optim.AdamW(groups, lr=0.0, betas=cfg.optim.betas, fused=use_fused or None)


def _share_cpu_cores(accelerator: Accelerator, num_workers: int) -> None:
    """On CPU, leave each loader worker a core: torch's default of one thread per core plus busy workers
    oversubscribes the machine, and spinning OpenMP threads then make steps several times slower.
    An explicit OMP_NUM_THREADS wins."""
    if accelerator.device.type != "cpu" or "OMP_NUM_THREADS" in os.environ:
        return
    per_process = (os.cpu_count() or 1) // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    torch.set_num_threads(max(1, per_process - num_workers))


class Trainer:
    """State of one pretraining run on this rank; `run()` trains to `train.total_steps` or a stop signal."""

    def __init__(self, cfg: Config, accelerator: Accelerator) -> None:
        self.cfg, self.acc = cfg, accelerator
        resolve_shards(cfg.data.train, cfg.data.allow_pipe)  # a missing shard fails here, before anything is written
        check_fsdp_supported(cfg, accelerator)  # not after days of training
        self.run_dir = Path(cfg.train.run_dir)
        found = latest_checkpoint(self.run_dir)
        if found is None:  # a new run: it must not overwrite what the directory already holds
            check_new_pretraining_dir(self.run_dir)
        _share_cpu_cores(accelerator, cfg.data.num_workers)
        # Same seed everywhere so every rank builds identical weights; ranks diverge (masks, data) only below.
        set_seed(cfg.train.seed)
        objective = build_objective(cfg.objective, getattr(cfg, cfg.objective), build_backbone(cfg.model),
                                    total_steps=cfg.train.total_steps,
                                    device_aug=cfg.data.device_aug,
                                    compile=cfg.train.compile)
        optimizer = build_optimizer(objective, cfg, use_fused=accelerator.device.type == "cuda")
        self.model, self.optimizer = accelerator.prepare(objective, optimizer)
        self.objective: Objective = accelerator.unwrap_model(self.model)
        set_seed(cfg.train.seed + accelerator.process_index)
        self.step, self.counters, self.checkpoint = 0, Counters(), None
        if found is not None:
            sharded = accelerator.distributed_type == DistributedType.FSDP
            check_resume_model(self.objective, cfg, found[1], sharded)  # before anything is loaded or written
            marker = load_checkpoint(accelerator, found[1])  # also restores every rank's RNG state
            self.step, self.checkpoint = marker["step"], found[1]
            self.counters = Counters.from_dict(marker.get("counters"))
            accelerator.print(f"resumed from {found[1]} (step {self.step})")
            if notice := process_count_notice(cfg, found[1], accelerator.num_processes):
                accelerator.print(notice)
        # Only now: a resume that fails must leave the run's config.yaml (what export rebuilds the model from) alone.
        if accelerator.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if found is not None and (notice := keep_changed_config(self.run_dir, cfg, self.step)):
                accelerator.print(notice)
            dump_config(cfg, self.run_dir / "config.yaml")
        # The stream is reseeded at every multiple of `segment` steps (the checkpoint grid): an uninterrupted run
        # and one resumed from any checkpoint then read the same batches.
        self.segment = cfg.train.save_every or cfg.train.total_steps
        # after a stop signal off the grid: skip what the interrupted run already read since the last grid point
        self.loader = self._stream(self.step - self.step % self.segment,
                                   skip=(self.step % self.segment) * cfg.optim.accum_steps)

    def _stream(self, start_step: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        # Deliberately not passed to accelerator.prepare: the stream already splits by rank and worker itself.
        # A batch is read in full (moved, trained on, logged) before the next is asked for, as the stream needs.
        cfg = self.cfg
        return training_batches(cfg.data, self.objective.views, self.acc.device, img_size=cfg.model.img_size,
                                rank=self.acc.process_index, world_size=self.acc.num_processes,
                                seed=cfg.train.seed, start_step=start_step, skip=skip,
                                progress=self.acc.is_main_process)

    def _set_schedules(self) -> tuple[float, float]:
        cfg = self.cfg
        lr = warmup_cosine(self.step, cfg.train.total_steps, cfg.train.warmup_steps,
                           peak_lr(cfg, self.acc.num_processes), cfg.optim.min_lr)
        wd_end = cfg.optim.weight_decay if cfg.optim.weight_decay_end is None else cfg.optim.weight_decay_end
        wd = cosine(self.step, cfg.train.total_steps, cfg.optim.weight_decay, wd_end)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd if group["apply_wd"] else 0.0
        return lr, wd

    def _forward_backward(self, window: StepWindow) -> tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor,
                                                             float]:
        """Accumulate gradients over `accum_steps` micro-batches; returns last outputs, batch, mean loss (on the
        device: reading it here would stall the GPU every micro-batch), wait."""
        accum, wait, loss_sum = self.cfg.optim.accum_steps, 0.0, None
        for micro in range(accum):
            t_wait = time.perf_counter()
            batch = to_device(next(self.loader), self.acc.device)
            wait += time.perf_counter() - t_wait
            window.add_batch(batch)
            # Gradients are all-reduced on the last micro-batch only.
            sync = self.acc.no_sync(self.model) if micro < accum - 1 else nullcontext()
            with sync, self.acc.autocast():
                out = self.model(batch, self.step)
                self.acc.backward(out["loss"] / accum)
            loss = out["loss"].detach().float()
            loss_sum = loss if loss_sum is None else loss_sum + loss
        return out, batch, loss_sum / accum, wait

    def _grad_norm(self) -> torch.Tensor:
        """Global gradient norm, clipped to `optim.clip_grad` when set (measured either way, for the NaN guard)."""
        clip = self.cfg.optim.clip_grad if self.cfg.optim.clip_grad is not None else float("inf")
        return self.acc.clip_grad_norm_(self.model.parameters(), clip)

    def _agree(self, stop: StopRequest, nonfinite: torch.Tensor) -> tuple[bool, bool]:
        """One small all-reduce per step: does any rank want to stop, did any rank see a non-finite value?
        Its one read to the host is the step's only host-device sync."""
        # torch.full is a fill kernel: torch.tensor([...], device=...) would be a blocking copy besides
        flags = torch.stack([torch.full((), float(stop.requested), device=self.acc.device), nonfinite.float()])
        stop_now, skip = (flag > 0 for flag in self.acc.reduce(flags, reduction="sum").tolist())
        return stop_now, skip

    def run(self) -> PretrainResult:
        acc, total = self.acc, self.cfg.train.total_steps
        log = RunLog(self.run_dir, enabled=acc.is_main_process, resume_step=self.step)
        bar = tqdm(total=total, initial=self.step, desc="pretrain", disable=not acc.is_main_process,
                   dynamic_ncols=True)
        try:
            stopped_by = self._train(log, bar)
        except RunAborted:  # what the objective has pending (DINO: a collapse episode) belongs to the diagnosis
            self.objective.after_training()
            raise
        bar.close()
        log.close()
        self.objective.after_training()
        if stopped_by:
            acc.print(f"stopped by {stopped_by} after step {self.step}; checkpoint: {self.checkpoint}; "
                      "run the same command again to continue")
            return PretrainResult(self.run_dir, self.step, None, stopped_by, self.checkpoint)
        return PretrainResult(self.run_dir, self.step, self._export(), None, self.checkpoint)

    def _train(self, log: RunLog, bar: tqdm) -> str | None:
        """Steps to `train.total_steps`; returns what stopped them early (a signal's name), else None."""
        cfg, acc, total = self.cfg, self.acc, self.cfg.train.total_steps
        window, consecutive_nonfinite, stopped_by = StepWindow(acc.device), 0, None
        self.model.train()
        with StopRequest() as stop:
            while self.step < total:
                t_start = time.perf_counter()
                lr, wd = self._set_schedules()
                out, batch, loss, wait = self._forward_backward(window)
                grad_norm = self._grad_norm()
                # fp16: the grad scaler already skips steps with inf/NaN gradients (and lowers its scale).
                check_grads = acc.mixed_precision != "fp16"  # the launcher may have chosen it (distributed.py)
                nonfinite = ~loss.isfinite() | (~grad_norm.isfinite() if check_grads else False)
                stop_now, skip = self._agree(stop, nonfinite)
                if skip:
                    self.optimizer.zero_grad(set_to_none=True)
                    self.objective.after_skipped_step(self.step)
                    if acc.scaler is not None:  # fp16: _grad_norm unscaled the gradients; end the scaler's step
                        acc.scaler.update()  # too (the next unscale_ raises otherwise), lowering its scale on inf
                    self.counters.nonfinite_steps += 1
                    consecutive_nonfinite += 1
                    if consecutive_nonfinite >= cfg.train.max_nonfinite_steps:
                        raise RunAborted(
                            f"{consecutive_nonfinite} consecutive steps had a NaN/inf loss or gradient norm (up to "
                            f"step {self.step + 1}); last good checkpoint: {self.checkpoint or 'none'}; lower the lr, "
                            "set optim.clip_grad, or use bf16 instead of fp16 (docs/troubleshooting.md)")
                else:
                    consecutive_nonfinite = 0
                    self.objective.after_backward(self.step)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.objective.after_step(self.step)
                self.step += 1
                bar.update(1)
                extra = {k: v for k, v in out.items() if k != "loss" and v.numel() == 1}
                if cfg.optim.clip_grad is not None:
                    extra["grad_norm"] = grad_norm
                window.add_step(None if skip else loss, wait, time.perf_counter() - t_start, extra)
                self._after_step(log, bar, window, batch, lr, wd, stop_now)
                if stop_now:
                    stopped_by = stop.name or "a signal on another rank"
                    break
        return stopped_by

    def _after_step(self, log: RunLog, bar: tqdm, window: StepWindow, batch: dict[str, Any], lr: float, wd: float,
                    stop_now: bool) -> None:
        cfg, step, total = self.cfg, self.step, self.cfg.train.total_steps
        on_grid = step % self.segment == 0
        save = on_grid or step == total or stop_now
        # a checkpoint step also closes the log window: its images and skips must be in the saved counters
        if step % cfg.train.log_every == 0 or save:
            scalars = {**window.reduce(self.acc, self.counters), "train/lr": lr, "train/weight_decay": wd}
            log.scalars(step, scalars)
            bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", lr=f"{lr:.2e}")
            self.counters.check_skip_rate(cfg.data.max_skip_rate)
        if cfg.train.image_every and (step % cfg.train.image_every == 0 or step == total) and self.acc.is_main_process:
            self.model.eval()
            for tag, image in self.objective.visualize(batch).items():
                log.image(step, tag, image)
            self.model.train()
        if save:
            self.checkpoint = save_checkpoint(self.acc, self.run_dir, step, cfg.train.keep_last,
                                              {"counters": self.counters.to_dict()})
            if self.acc.is_main_process:
                bar.write(f"checkpoint: {self.checkpoint}")
        if on_grid and step < total and not stop_now:
            self.loader = self._stream(step)  # reseed on the grid (see __init__)

    def _export(self) -> Path | None:
        cfg, acc = self.cfg, self.acc
        if not cfg.train.export:
            return None
        if acc.is_main_process:
            path = export_backbone(self.objective.export_backbone(), self.run_dir, cfg.model.name,
                                   backbone_kwargs(cfg.model), {"objective": cfg.objective, "step": self.step})
            acc.print(f"exported backbone: {path}")
        acc.wait_for_everyone()
        return self.run_dir / "backbone.safetensors"


def pretrain(cfg: Config, accelerator: Accelerator | None = None) -> PretrainResult:
    """Train `cfg.objective` on `cfg.data.train`, resuming from the newest checkpoint in `cfg.train.run_dir`."""
    return Trainer(cfg, accelerator or make_accelerator(cfg.train.precision)).run()


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
