"""The one step-based training loop: it runs any `Objective` and never asks which one. Pretraining (`pretrain`) and
fine-tuning (eval/finetune.py) hand it the objective, optimizer, batch stream, schedules and `LoopSettings`.
Its guarantees (exact resume, graceful stops, NaN/inf skips, skip-rate aborts): docs/design.md."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from tqdm.auto import tqdm

from ssl_vit.config.pretrain import Config, dump_config
from ssl_vit.data.batches import to_device, training_batches
from ssl_vit.data.shard_urls import resolve_shards
from ssl_vit.methods import Objective, build_objective
from ssl_vit.models.backbone import backbone_kwargs, build_backbone
from ssl_vit.models.init_weights import init_objective
from ssl_vit.training.checkpoint import export_backbone, latest_checkpoint, load_checkpoint, save_checkpoint
from ssl_vit.training.distributed import make_accelerator, share_cpu_cores
from ssl_vit.training.gather import backbone_state, objective_images
from ssl_vit.training.monitor import Counters, RunAborted, StepWindow
from ssl_vit.training.optim import build_optimizer, cosine, peak_lr, warmup_cosine
from ssl_vit.training.run_dir import (
    PRETRAINING,
    check_resume_model,
    check_run_dir,
    hold_run_dir,
    keep_changed_config,
    process_count_notice,
)
from ssl_vit.training.run_log import RunLog
from ssl_vit.training.signals import StopRequest

__all__ = ["LoopSettings", "RunResult", "Trainer", "build_optimizer", "peak_lr", "pretrain", "resolve_demo"]

Stream = Callable[[int, int], Iterator[dict[str, Any]]]  # (start step, batches to skip) → endless batches
Schedule = Callable[[int], tuple[float, float]]  # step → (lr, weight decay); a group's `lr_scale` multiplies the lr


@dataclass(frozen=True)
class LoopSettings:
    """How the loop steps, logs and saves: pretraining takes them from its `train.*` and `optim.*` keys."""

    run_dir: Path
    total_steps: int  # the run ends after this optimizer step
    seed: int  # rank r draws from seed + r
    accum_steps: int = 1  # micro-batches per optimizer step
    clip_grad: float | None = None  # global grad-norm clip; None = none (the norm is measured either way)
    log_every: int = 20
    save_every: int = 0  # the checkpoint grid, on which the stream is also reseeded; 0 = at the end only
    keep_last: int = 2  # complete checkpoints kept
    image_every: int = 0  # steps between the objective's TensorBoard images; 0 = never
    max_nonfinite_steps: int = 20  # consecutive NaN/inf steps before the run aborts
    max_skip_rate: float = 0.1  # share of unusable samples before the run aborts
    name: str = "pretrain"  # of the progress bar


class Evaluation(Protocol):
    """Run on every rank each `every` steps and after the last; its state (JSON) rides along in checkpoints."""

    every: int
    def __call__(self, step: int) -> dict[str, float]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class RunResult:
    run_dir: Path
    step: int  # optimizer steps done in total (this run and the ones it resumed)
    backbone: Path | None  # exported backbone.safetensors, when exported
    stopped_by: str | None = None  # signal name when a SIGTERM/SIGINT ended the run early
    checkpoint: Path | None = None  # the newest checkpoint written


class Trainer:
    """One run on this rank; `run()` trains to `total_steps` or a stop signal. `resume`: the checkpoint to go on
    from, checked by the caller."""

    def __init__(self, accelerator: Accelerator, objective: Objective, optimizer: torch.optim.Optimizer,
                 stream: Stream, schedule: Schedule, settings: LoopSettings, *, resume: Path | None = None,
                 evaluation: Evaluation | None = None) -> None:
        self.acc, self.s, self.schedule, self.evaluation = accelerator, settings, schedule, evaluation
        accelerator.free_memory()  # a checkpoint holds this run's model only, not one an earlier caller prepared
        self.model, self.optimizer = accelerator.prepare(objective, optimizer)
        self.objective: Objective = accelerator.unwrap_model(self.model)
        set_seed(settings.seed + accelerator.process_index)  # ranks diverge (masks, data) only from here
        self.step, self.counters, self.checkpoint = 0, Counters(), resume
        if resume is not None:
            marker = load_checkpoint(accelerator, resume)  # also restores every rank's RNG state
            self.step, self.counters = marker["step"], Counters(**(marker.get("counters") or {}))
            if evaluation is not None:
                evaluation.load_state_dict(marker["evaluation"])
            accelerator.print(f"resumed from {resume} (step {self.step})")
        # Reseeded on the checkpoint grid (exact resume, docs/design.md); not prepared: it splits by rank itself.
        self.stream, self.segment = stream, settings.save_every or settings.total_steps
        self.loader = stream(self.step - self.step % self.segment, (self.step % self.segment) * settings.accum_steps)

    def _forward_backward(self, window: StepWindow) -> tuple[dict[str, torch.Tensor], dict[str, Any], torch.Tensor,
                                                             float]:
        """Accumulate gradients over `accum_steps` micro-batches; returns last outputs, batch, mean loss (left on
        the device: reading it would stall the GPU), wait."""
        accum, wait, loss_sum = self.s.accum_steps, 0.0, None
        for micro in range(accum):
            t_wait = time.perf_counter()
            # A batch is read in full (moved, trained on, logged) before the next is asked for, as the stream needs.
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

    def run(self) -> RunResult:
        acc = self.acc
        log = RunLog(self.s.run_dir, enabled=acc.is_main_process, resume_step=self.step)
        bar = tqdm(total=self.s.total_steps, initial=self.step, desc=self.s.name, disable=not acc.is_main_process,
                   dynamic_ncols=True)
        try:
            stopped_by = self._train(log, bar)
        except RunAborted:  # what the objective has pending (DINO: a collapse episode) belongs to the diagnosis
            self.objective.after_training()
            raise
        finally:  # a failure's one line comes last, not above a progress bar redrawn at exit
            bar.close()
            log.close()
        self.objective.after_training()
        if stopped_by:
            acc.print(f"stopped by {stopped_by} after step {self.step}; checkpoint: {self.checkpoint}; "
                      "run the same command again to continue")
        return RunResult(self.s.run_dir, self.step, None, stopped_by, self.checkpoint)

    def _train(self, log: RunLog, bar: tqdm) -> str | None:
        """Steps to `total_steps`; returns what stopped them early (a signal's name), else None."""
        acc, total = self.acc, self.s.total_steps
        window, consecutive_nonfinite, stopped_by = StepWindow(acc.device), 0, None
        self.model.train()
        with StopRequest() as stop:
            while self.step < total:
                t_start = time.perf_counter()
                lr, wd = self.schedule(self.step)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)  # layer decay (fine-tuning)
                    group["weight_decay"] = wd if group["apply_wd"] else 0.0
                out, batch, loss, wait = self._forward_backward(window)
                # measured even unclipped, for the NaN guard
                clip = self.s.clip_grad if self.s.clip_grad is not None else float("inf")
                grad_norm = acc.clip_grad_norm_(self.model.parameters(), clip)
                # fp16 (perhaps the launcher's choice): the grad scaler already skips inf/NaN gradients.
                nonfinite = ~loss.isfinite() | (~grad_norm.isfinite() if acc.mixed_precision != "fp16" else False)
                # One all-reduce, the step's only host sync (torch.full: a fill kernel, not a blocking copy).
                flags = torch.stack([torch.full((), float(bool(stop.name)), device=acc.device), nonfinite.float()])
                stop_now, skip = (flag > 0 for flag in acc.reduce(flags, reduction="sum").tolist())
                if skip:
                    self.optimizer.zero_grad(set_to_none=True)
                    self.objective.after_skipped_step(self.step)
                    if acc.scaler is not None:  # fp16: clipping unscaled the gradients; end the scaler's step too
                        acc.scaler.update()  # (the next unscale_ raises otherwise), lowering its scale on inf
                    self.counters.nonfinite_steps += 1
                    consecutive_nonfinite += 1
                    if consecutive_nonfinite >= self.s.max_nonfinite_steps:
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
                if self.s.clip_grad is not None:
                    extra["grad_norm"] = grad_norm
                window.add_step(None if skip else loss, wait, time.perf_counter() - t_start, extra)
                self._after_step(log, bar, window, batch, lr, wd, stop_now)
                if stop_now:
                    stopped_by = stop.name or "a signal on another rank"
                    break
        return stopped_by

    def _after_step(self, log: RunLog, bar: tqdm, window: StepWindow, batch: dict[str, Any], lr: float, wd: float,
                    stop_now: bool) -> None:
        s, step, total = self.s, self.step, self.s.total_steps
        on_grid = step % self.segment == 0
        save = on_grid or step == total or stop_now
        # a checkpoint step also closes the log window: its images and skips must be in the saved counters
        if step % s.log_every == 0 or save:
            scalars = {**window.reduce(self.acc, self.counters), "train/lr": lr, "train/weight_decay": wd}
            log.scalars(step, scalars)
            bar.set_postfix(loss=f"{scalars['train/loss']:.4f}", lr=f"{lr:.2e}")
            self.counters.check_skip_rate(s.max_skip_rate)
        if s.image_every and (step % s.image_every == 0 or step == total):
            self.model.eval()
            images = objective_images(self.acc, self.model, self.objective, batch)  # None off the main process
            for tag, image in (images or {}).items():
                log.image(step, tag, image)
            self.model.train()
        evaluation = self.evaluation
        if evaluation is not None and (step % evaluation.every == 0 or step == total):
            log.scalars(step, evaluation(step))  # before the save: the checkpoint keeps what it found
        if save:
            extra = {"counters": dataclasses.asdict(self.counters)}
            if evaluation is not None:
                extra["evaluation"] = evaluation.state_dict()
            self.checkpoint = save_checkpoint(self.acc, s.run_dir, step, s.keep_last, extra)
            if self.acc.is_main_process:
                bar.write(f"checkpoint: {self.checkpoint}")
        if on_grid and step < total and not stop_now:
            self.loader = self.stream(step, 0)  # reseed on the grid (see __init__)


def pretrain(cfg: Config, accelerator: Accelerator | None = None) -> RunResult:
    """Train `cfg.objective` on `cfg.data.train`, resuming from the newest checkpoint in `cfg.train.run_dir`."""
    acc = accelerator or make_accelerator(cfg.train.precision)
    resolve_shards(cfg.data.train, cfg.data.allow_pipe)  # a missing shard fails here, before anything is written
    with hold_run_dir(Path(cfg.train.run_dir), acc):
        return _pretrain(cfg, acc)


def _pretrain(cfg: Config, acc: Accelerator) -> RunResult:
    t, run_dir = cfg.train, Path(cfg.train.run_dir)
    found = latest_checkpoint(run_dir, acc)  # checksums read once, by the main process
    check_run_dir(run_dir, PRETRAINING, resuming=found is not None)  # a new run must not overwrite what it holds
    share_cpu_cores(acc, cfg.data.num_workers)
    set_seed(t.seed)  # the same weights on every rank
    objective = build_objective(cfg.objective, getattr(cfg, cfg.objective), build_backbone(cfg.model),
                                total_steps=t.total_steps, device_aug=cfg.data.device_aug, compile=t.compile)
    if cfg.model.init and found is None:  # a resume takes every weight from its checkpoint, not from model.init
        acc.print(init_objective(objective, cfg.model))
    objective.freeze_backbone_steps = t.freeze_backbone_steps  # `after_backward` drops the backbone's gradients
    optimizer = build_optimizer(objective, cfg, use_fused=acc.device.type == "cuda")
    if found is not None:  # before anything is loaded or written
        check_resume_model(objective, cfg, found[1], acc.distributed_type == DistributedType.FSDP)
    peak = peak_lr(cfg, acc.num_processes)
    wd_end = cfg.optim.weight_decay if cfg.optim.weight_decay_end is None else cfg.optim.weight_decay_end

    def schedule(step: int) -> tuple[float, float]:
        return (warmup_cosine(step, t.total_steps, t.warmup_steps, peak, cfg.optim.min_lr),
                cosine(step, t.total_steps, cfg.optim.weight_decay, wd_end))

    def stream(start_step: int, skip: int) -> Iterator[dict[str, Any]]:
        return training_batches(cfg.data, objective.views, acc.device, img_size=cfg.model.img_size,
                                rank=acc.process_index, world_size=acc.num_processes, seed=t.seed,
                                start_step=start_step, skip=skip, progress=acc.is_main_process)

    settings = LoopSettings(run_dir, t.total_steps, t.seed, cfg.optim.accum_steps, cfg.optim.clip_grad, t.log_every,
                            t.save_every, t.keep_last, t.image_every, t.max_nonfinite_steps, cfg.data.max_skip_rate)
    trainer = Trainer(acc, objective, optimizer, stream, schedule, settings, resume=found[1] if found else None)
    if found is not None and (notice := process_count_notice(cfg, found[1], acc.num_processes)):
        acc.print(notice)
    # Only now: a resume that fails must leave the run's config.yaml (what export rebuilds the model from) alone.
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if found is not None and (notice := keep_changed_config(run_dir, cfg, trainer.step)):
            acc.print(notice)
        dump_config(cfg, run_dir / "config.yaml")
    result = trainer.run()
    if t.export and not result.stopped_by:
        # under FSDP every rank joins the gather; the main process writes
        state = backbone_state(acc, trainer.model, trainer.objective.export_backbone())
        if acc.is_main_process:
            path = export_backbone(state, run_dir, cfg.model.name,
                                   backbone_kwargs(cfg.model), {"objective": cfg.objective, "step": result.step})
            acc.print(f"exported backbone: {path}")
        acc.wait_for_everyone()
        result.backbone = run_dir / "backbone.safetensors"
    return result


def resolve_demo(cfg: Config) -> Config:
    """Without training shards, the built-in demo data (generated once, cached), and its labelled splits for k-NN
    unless k-NN shards are given."""
    if cfg.data.train:
        return cfg
    from ssl_vit.data.demo import ensure_demo_data

    demo = ensure_demo_data()
    ev = cfg.eval
    if not ev.knn_train and not ev.knn_val:
        ev = dataclasses.replace(ev, knn_train=demo.knn_train, knn_val=demo.knn_val)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train=demo.train), eval=ev)
