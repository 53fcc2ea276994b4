"""Full fine-tuning of an exported backbone with a new classifier (methods/classify) through the one training
loop, evaluated on val every epoch, the best exported (docs/evaluation.md#fine-tuning)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import set_seed

from ssl_vit.config.finetune import FinetuneConfig, FTDataConfig, load_finetune_config
from ssl_vit.config.pretrain import DataConfig, dump_config
from ssl_vit.data.samples import SKIP_REASONS
from ssl_vit.eval.features import describe_skipped, encode_shards
from ssl_vit.eval.labelled import check_class_lists, count_samples, labelled_train_stream
from ssl_vit.eval.metrics import check_labelled, topk_accuracy
from ssl_vit.methods.classify.model import Classify
from ssl_vit.training.checkpoint import export_backbone, latest_checkpoint, model_mismatch
from ssl_vit.training.distributed import make_accelerator, share_cpu_cores
from ssl_vit.training.loop import LoopSettings, Trainer
from ssl_vit.training.optim import build_optimizer, peak_lr, warmup_cosine
from ssl_vit.training.run_dir import FINETUNING, check_run_dir, hold_run_dir, keep_changed_config


@dataclass
class FinetuneResult:
    run_dir: Path
    step: int  # optimizer steps done
    best: dict[str, Any]  # {"epoch", "step", "top1", "top5", "n"} of the best evaluation ({"top1": -1} before any)
    exported: Path | None  # best/backbone.safetensors (classifier included)
    stopped_by: str | None = None  # signal name when a SIGTERM/SIGINT ended the run early


class EpochEvaluation:
    """The loop's evaluation: val top-1/top-5 after every epoch, the best model so far exported to run_dir/best."""

    def __init__(self, objective: Classify, data: FTDataConfig, accelerator: Accelerator, every: int, best_dir: Path,
                 finetuned_from: str) -> None:
        self.objective, self.data, self.acc, self.every = objective, data, accelerator, every
        self.best_dir, self.finetuned_from = best_dir, finetuned_from
        self.best: dict[str, Any] = {"top1": -1.0}
        self.history: list[dict[str, Any]] = []
        self.val_skipped: dict[str, int] = {}  # the same val set every epoch: reported once, in finetune.json

    def __call__(self, step: int) -> dict[str, float]:
        """Top-1/top-5 over the val shards, gathered from all ranks."""
        d, model, was_training = self.data, self.objective.backbone, self.objective.backbone.training
        model.eval()
        val = encode_shards(model, model.num_classes, d.val, self.acc, img_size=model.patch_embed.img_size[0],
                            batch_size=d.batch_size, num_workers=min(d.num_workers, 4), crop_ratio=d.crop_ratio,
                            allow_pipe=d.allow_pipe)
        model.train(was_training)
        # a label beyond the head would only ever count as a miss: the val set does not fit the model
        check_labelled(val.labels, "fine-tuning", "val", model.num_classes, "of the model")
        scores = {**topk_accuracy(val.features, val.labels), "n": float(val.features.shape[0])}
        self.val_skipped = val.skipped
        epoch = -(-step // self.every)  # the last evaluation of a run cut short by max_steps: a partial epoch
        self.history.append({"epoch": epoch, "step": step, **scores})
        self.acc.print(f"epoch {epoch}: val top-1 {scores['top1']:.2f}%  top-5 {scores['top5']:.2f}%")
        if scores["top1"] > self.best["top1"]:
            self.best = self.history[-1]
            if self.acc.is_main_process:
                export_backbone(model, self.best_dir, self.objective.model_name, self.objective.model_kwargs,
                                {"finetuned_from": self.finetuned_from, **self.best})
            self.acc.wait_for_everyone()
        return {"val/top1": scores["top1"], "val/top5": scores["top5"], "epoch": epoch}

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "history": self.history, "val_skipped": self.val_skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.history, self.val_skipped = state["best"], state["history"], state["val_skipped"]


def resolve_finetune_demo(cfg: FinetuneConfig) -> FinetuneConfig:
    """Empty data.train / data.val: the built-in demo's labelled splits (generated once, then cached)."""
    if cfg.data.train and cfg.data.val:
        return cfg
    from ssl_vit.data.demo import ensure_demo_data

    demo = ensure_demo_data()
    data = dataclasses.replace(cfg.data, train=cfg.data.train or demo.knn_train, val=cfg.data.val or demo.knn_val)
    return dataclasses.replace(cfg, data=data)


def finetune(cfg: FinetuneConfig, accelerator: Accelerator | None = None) -> FinetuneResult:
    """Fine-tune `cfg.model.backbone` on `cfg.data.train`, evaluating on `cfg.data.val` after every epoch;
    resumes from the newest checkpoint in `cfg.train.run_dir`."""
    acc = accelerator or make_accelerator(cfg.train.precision)
    with hold_run_dir(Path(cfg.train.run_dir), acc):  # one run at a time in a run dir
        return _finetune(cfg, acc)


def _finetune(cfg: FinetuneConfig, acc: Accelerator) -> FinetuneResult:
    run_dir, d, t = Path(cfg.train.run_dir), cfg.data, cfg.train
    found = latest_checkpoint(run_dir, acc)  # checksums read once, by the main process
    check_run_dir(run_dir, FINETUNING, resuming=found is not None)  # a new run must not replace a best model
    classes = check_class_lists(d.train, d.val, d.allow_pipe)  # train and val labels must name the same classes
    num_classes = d.num_classes or (len(classes.names) if classes is not None else None)
    if not num_classes:
        raise ValueError("data.num_classes: no classes.txt beside the train or val shards; set the number of "
                         "classes")
    n_train = d.train_size or count_samples(d.train, d.allow_pipe)
    share_cpu_cores(acc, d.num_workers)
    set_seed(t.seed)  # the same head init on every rank
    objective = Classify(cfg.model, cfg.augment, num_classes, cfg.optim.layer_decay)
    optimizer = build_optimizer(objective, cfg, use_fused=acc.device.type == "cuda")
    if found is not None and (mismatch := model_mismatch(objective, found[1])):
        raise ValueError(f"checkpoint {found[1]} was made with a different model ({mismatch}); resume with the "
                         "run's own config, or set a new train.run_dir")
    global_batch = d.batch_size * acc.num_processes * cfg.optim.accum_steps
    steps_per_epoch = max(1, n_train // global_batch)
    total = t.epochs * steps_per_epoch
    peak, warmup = peak_lr(cfg, acc.num_processes), t.warmup_epochs * steps_per_epoch

    def schedule(step: int) -> tuple[float, float]:
        return warmup_cosine(step, total, warmup, peak, cfg.optim.min_lr), cfg.optim.weight_decay

    # a checkpoint at every epoch end, right after its evaluation; the stream is reseeded there too
    settings = LoopSettings(run_dir, min(total, t.max_steps or total), t.seed, cfg.optim.accum_steps,
                            cfg.optim.clip_grad, t.log_every, save_every=steps_per_epoch, keep_last=t.keep_last,
                            max_nonfinite_steps=t.max_nonfinite_steps, max_skip_rate=DataConfig.max_skip_rate,
                            name="finetune")
    def batches(start_step: int, skip: int) -> Iterator[dict[str, Any]]:  # the loop's Stream
        return labelled_train_stream(d.train, objective.views, num_classes, "fine-tuning", batch_size=d.batch_size,
                                     num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer,
                                     rank=acc.process_index, world_size=acc.num_processes, seed=t.seed,
                                     start_step=start_step, skip=skip, allow_pipe=d.allow_pipe)

    evaluation = EpochEvaluation(objective, d, acc, steps_per_epoch, run_dir / "best", cfg.model.backbone)
    trainer = Trainer(acc, objective, optimizer, batches, schedule, settings, resume=found[1] if found else None,
                      evaluation=evaluation)
    if acc.is_main_process:  # only once the inputs have checked out: a failed start writes nothing
        run_dir.mkdir(parents=True, exist_ok=True)
        if found is not None and (notice := keep_changed_config(run_dir, cfg, trainer.step, load_finetune_config)):
            acc.print(notice)
        dump_config(cfg, run_dir / "config.yaml")
    acc.print(f"fine-tune: {n_train} train images, {num_classes} classes, global batch {global_batch}, "
              f"{steps_per_epoch} steps/epoch, peak lr {peak:.3g}")
    result = trainer.run()
    if result.stopped_by:
        return FinetuneResult(run_dir, result.step, evaluation.best, None, result.stopped_by)
    if not evaluation.history:  # a rerun asked to end before its checkpoint's step, which no evaluation followed
        evaluation(result.step)
    best = evaluation.best
    skipped = {"train": dict(zip(SKIP_REASONS, trainer.counters.skipped, strict=True)), "val": evaluation.val_skipped}
    acc.print(f"fine-tune data: {n_train} train images ({describe_skipped(skipped['train'])} while drawing "
              f"batches), {int(best['n'])} val images ({describe_skipped(skipped['val'])})")
    if acc.is_main_process:
        summary = {"best": best, "history": evaluation.history, "num_classes": num_classes, "n_train": n_train,
                   "skipped": skipped}
        (run_dir / "finetune.json").write_text(json.dumps(summary, indent=2) + "\n")
    return FinetuneResult(run_dir, result.step, best, run_dir / "best" / "backbone.safetensors")
