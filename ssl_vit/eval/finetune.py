"""Full fine-tuning of an exported backbone with a new classifier, MAE-style, through Accelerate.

    model = timm ViT + head, backbone weights loaded (pool avg: fresh fc_norm, as MAE's global pool)
    data  = labelled resampled shards → timm.data.create_transform (RandAugment, random erasing) → Mixup/CutMix
    optim = AdamW over MAE's layer-decay param groups; lr = warmup_cosine(step) × each group's lr_scale
    every epoch: top-1/top-5 on val (gathered across ranks); the best is exported timm-loadable
    skipped (unusable) samples are counted by reason, train and val, all ranks summed
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from PIL import Image
from timm.data import Mixup, auto_augment, create_transform
from timm.data.auto_augment import RandAugment
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from tqdm.auto import tqdm

from ssl_vit.config.finetune import FinetuneConfig, FTAugmentConfig, FTModelConfig
from ssl_vit.config.pretrain import to_dict
from ssl_vit.data.samples import SKIP_REASONS
from ssl_vit.data.shards import eval_stream
from ssl_vit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from ssl_vit.eval.features import describe_skipped, distinct_shards, gather_by_key, skip_totals
from ssl_vit.eval.labelled import check_class_lists, check_label_count, count_samples, labelled_train_stream
from ssl_vit.eval.layer_decay import param_groups_lrd
from ssl_vit.eval.metrics import topk_accuracy
from ssl_vit.training.checkpoint import export_backbone, load_backbone
from ssl_vit.training.distributed import make_accelerator
from ssl_vit.training.optim import warmup_cosine
from ssl_vit.training.run_dir import check_finetune_dir
from ssl_vit.training.run_log import RunLog


@dataclass
class FinetuneResult:
    run_dir: Path
    step: int  # optimizer steps done
    best: dict[str, Any]  # {"epoch", "step", "top1", "top5"} of the best evaluation
    exported: Path | None  # best/backbone.safetensors (classifier included)


def build_classifier(cfg: FTModelConfig, num_classes: int) -> tuple[VisionTransformer, str, dict[str, Any]]:
    """The backbone's timm architecture with a `num_classes` head; returns (model, timm name, timm kwargs)."""
    if not cfg.backbone:
        raise ValueError("model.backbone: give the exported backbone (run dir or backbone.safetensors)")
    vit, meta = load_backbone(cfg.backbone, random_init=cfg.random_init)
    pool = "avg" if cfg.pool == "avg" else "token"
    kwargs = {**meta["model_kwargs"], "num_classes": num_classes, "global_pool": pool}
    model = timm.create_model(meta["model_name"], pretrained=False, drop_path_rate=cfg.drop_path_rate, **kwargs)
    state = {k: v for k, v in vit.state_dict().items() if not k.startswith("head.")}
    expected_missing = {"head.weight", "head.bias"}
    if cfg.pool == "avg":  # MAE's global pool: the final norm moves after pooling, as a fresh fc_norm
        state = {k: v for k, v in state.items() if not k.startswith(("norm.", "fc_norm."))}
        expected_missing |= {"fc_norm.weight", "fc_norm.bias"}
    loaded = model.load_state_dict(state, strict=False)
    if set(loaded.missing_keys) != expected_missing or loaded.unexpected_keys:
        raise ValueError(f"{cfg.backbone}: cannot fine-tune it with pool={cfg.pool!r} (missing "
                         f"{sorted(set(loaded.missing_keys) - expected_missing)}, unexpected {loaded.unexpected_keys})")
    with torch.no_grad():
        torch.nn.init.normal_(model.head.weight, std=cfg.head_init_std)
        torch.nn.init.zeros_(model.head.bias)
    return model, meta["model_name"], kwargs


def train_transform(cfg: FTAugmentConfig, img_size: int) -> Any:
    """timm's ImageNet training transform: RandomResizedCrop (bicubic), flip, RandAugment, random erasing."""
    transform = create_transform(input_size=img_size, is_training=True, scale=cfg.crop_scale,
                                 color_jitter=cfg.color_jitter or None, auto_augment=cfg.auto_augment or None,
                                 interpolation="bicubic", re_prob=cfg.reprob, re_mode=cfg.remode,
                                 re_count=cfg.recount, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    for step in getattr(transform, "transforms", ()):
        for op in step.ops if isinstance(step, RandAugment) else ():
            if op.aug_fn is auto_augment.posterize:
                op.aug_fn = posterize_any_bits  # this instance only; timm's op table stays as it is
    return transform


def posterize_any_bits(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize op, also for 0 bits (a black image, as Pillow < 13 made it; Pillow 13 raises).

    RandAugment "rand-m9-mstd0.5-inc1" asks for 0 bits whenever the sampled magnitude reaches 10 (~2% of
    the posterize draws), which would end a fine-tuning run with timm 1.0 on Pillow 13.
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep)


def mixup_and_criterion(cfg: FTAugmentConfig, num_classes: int) -> tuple[Mixup | None, torch.nn.Module]:
    """Mixup/CutMix make soft targets (with smoothing folded in), else smoothed or plain cross-entropy."""
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode, label_smoothing=cfg.smoothing,
                      num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return None, torch.nn.CrossEntropyLoss()


@torch.no_grad()
def evaluate_classifier(model: torch.nn.Module, shards: str, accelerator: Accelerator, *, img_size: int,
                        batch_size: int, num_workers: int, crop_ratio: float, allow_pipe: bool) -> dict[str, Any]:
    """{"top1", "top5" (%), "n", "skipped" (by reason)} over the val shards; every rank reads its share, logits
    and skip counts are gathered from all ranks."""
    was_training = model.training
    model.eval()
    loader = eval_stream(distinct_shards(shards, allow_pipe), eval_transform(img_size, crop_ratio),
                         batch_size=batch_size, num_workers=num_workers, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, allow_pipe=allow_pipe)
    logits, labels, keys = [], [], []
    skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)
    for batch in loader:
        skipped += batch["skipped"].sum(dim=0)
        if not batch["key"]:  # skip counts only, of a loader worker that found no usable sample
            continue
        with accelerator.autocast():
            logits.append(model(batch["image"].to(accelerator.device, non_blocking=True)).float())
        labels.append(batch["label"].to(accelerator.device))
        keys += list(batch["key"])
    n_classes = model.num_classes
    local_logits = torch.cat(logits) if logits else torch.zeros(0, n_classes, device=accelerator.device)
    local_labels = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=accelerator.device)
    result = gather_by_key(accelerator, local_logits, local_labels, keys, skipped)
    model.train(was_training)
    # a label beyond the head would only ever count as a miss: the val set does not fit the model
    check_label_count(result.labels, n_classes, "of the model", "fine-tuning", "val")
    return {**topk_accuracy(result.features, result.labels), "n": float(result.features.shape[0]),
            "skipped": result.skipped}


def resolve_finetune_demo(cfg: FinetuneConfig) -> FinetuneConfig:
    """Empty data.train / data.val: the built-in demo's labelled splits (generated once, then cached)."""
    if cfg.data.train and cfg.data.val:
        return cfg
    from ssl_vit.data.demo import ensure_demo_data

    demo = ensure_demo_data()
    data = dataclasses.replace(cfg.data, train=cfg.data.train or demo.knn_train, val=cfg.data.val or demo.knn_val)
    return dataclasses.replace(cfg, data=data)


def _check_train_labels(labels: torch.Tensor, num_classes: int) -> None:
    """On the loader's CPU labels, before they are copied: on the device the check would stall every micro-batch."""
    if (labels < 0).any() or (labels >= num_classes).any():
        raise ValueError(f"fine-tuning needs labels in [0, {num_classes}) on every train sample")


def finetune(cfg: FinetuneConfig, accelerator: Accelerator | None = None) -> FinetuneResult:
    """Fine-tune `cfg.model.backbone` on `cfg.data.train`, evaluating on `cfg.data.val` after every epoch."""
    accelerator = accelerator or make_accelerator(cfg.train.precision)
    run_dir = Path(cfg.train.run_dir)
    check_finetune_dir(run_dir)  # before anything is written: a rerun must not replace an earlier best model
    d, opt = cfg.data, cfg.optim
    classes = check_class_lists(d.train, d.val, d.allow_pipe)  # train and val labels must name the same classes
    num_classes = d.num_classes or (len(classes.names) if classes is not None else None)
    if not num_classes:
        raise ValueError("data.num_classes: no classes.txt beside the train or val shards; set the number of "
                         "classes")
    n_train = d.train_size or count_samples(d.train, d.allow_pipe)
    set_seed(cfg.train.seed)  # the same head init on every rank
    model, model_name, model_kwargs = build_classifier(cfg.model, num_classes)
    if accelerator.is_main_process:  # only once the inputs have checked out: a failed start writes nothing
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    img_size = model.patch_embed.img_size[0]
    groups = param_groups_lrd(model, opt.weight_decay, model.no_weight_decay(), opt.layer_decay)
    # lr comes from the schedule every step; fused: one kernel for all parameters on CUDA
    optimizer = torch.optim.AdamW(groups, lr=0.0, betas=opt.betas, fused=accelerator.device.type == "cuda" or None)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    set_seed(cfg.train.seed + accelerator.process_index)

    global_batch = d.batch_size * accelerator.num_processes * opt.accum_steps
    steps_per_epoch = max(1, n_train // global_batch)
    total = cfg.train.epochs * steps_per_epoch
    last = min(total, cfg.train.max_steps) if cfg.train.max_steps is not None else total
    peak = opt.lr if opt.lr is not None else opt.base_lr * global_batch / 256
    mixup, criterion = mixup_and_criterion(cfg.augment, num_classes)
    loader = iter(labelled_train_stream(d.train, train_transform(cfg.augment, img_size), batch_size=d.batch_size,
                                        num_workers=d.num_workers, shuffle_buffer=d.shuffle_buffer,
                                        rank=accelerator.process_index,
                                        world_size=accelerator.num_processes, seed=cfg.train.seed,
                                        allow_pipe=d.allow_pipe, device=accelerator.device))
    eval_kwargs = dict(img_size=img_size, batch_size=d.batch_size, num_workers=min(d.num_workers, 4),
                       crop_ratio=d.crop_ratio, allow_pipe=d.allow_pipe)
    log = RunLog(run_dir, enabled=accelerator.is_main_process)
    accelerator.print(f"fine-tune: {n_train} train images, {num_classes} classes, global batch {global_batch}, "
                      f"{steps_per_epoch} steps/epoch, peak lr {peak:.3g}")
    bar = tqdm(total=last, desc="finetune", disable=not accelerator.is_main_process, dynamic_ncols=True)
    best: dict[str, Any] = {"top1": -1.0}
    # the window's loss stays on the device: reading it every step would stall a GPU on each one
    history, window, t0 = [], [torch.zeros((), device=accelerator.device), 0], time.perf_counter()
    train_skipped = torch.zeros(len(SKIP_REASONS), dtype=torch.long)  # met while drawing batches (resampled)
    val_skipped: dict[str, int] = {}
    model.train()
    for step in range(last):
        lr = warmup_cosine(step, total, cfg.train.warmup_epochs * steps_per_epoch, peak, opt.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # layer decay
        for micro in range(opt.accum_steps):
            batch = next(loader)
            train_skipped += batch["skipped"].sum(dim=0)
            labels = batch["label"]
            _check_train_labels(labels, num_classes)
            images = batch["image"].to(accelerator.device, non_blocking=True)
            targets = labels.to(accelerator.device, non_blocking=True)
            if mixup is not None:
                images, targets = mixup(images, targets)
            sync = accelerator.no_sync(model) if micro < opt.accum_steps - 1 else nullcontext()
            with sync, accelerator.autocast():
                loss = criterion(model(images), targets)
                accelerator.backward(loss / opt.accum_steps)
            window[0] += loss.detach().float() / opt.accum_steps
        if opt.clip_grad is not None:
            accelerator.clip_grad_norm_(model.parameters(), opt.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window[1] += 1
        bar.update(1)
        done = step + 1
        if done % cfg.train.log_every == 0 or done == last:
            mean_loss = accelerator.reduce(window[0] / window[1], "mean")
            log.scalars(done, {"train/loss": float(mean_loss), "train/lr": lr,
                               "perf/step_time_s": (time.perf_counter() - t0) / window[1]})
            bar.set_postfix(loss=f"{float(mean_loss):.4f}", lr=f"{lr:.2e}")
            window, t0 = [torch.zeros((), device=accelerator.device), 0], time.perf_counter()
        if done % steps_per_epoch == 0 or done == last:  # end of an epoch (or of a run stopped by max_steps)
            scores = evaluate_classifier(unwrapped, d.val, accelerator, **eval_kwargs)
            val_skipped = scores.pop("skipped")  # the same val set every epoch: reported once, in finetune.json
            epoch = -(-done // steps_per_epoch)
            log.scalars(done, {"val/top1": scores["top1"], "val/top5": scores["top5"], "epoch": epoch})
            history.append({"epoch": epoch, "step": done, **scores})
            accelerator.print(f"epoch {epoch}: val top-1 {scores['top1']:.2f}%  top-5 {scores['top5']:.2f}%")
            if scores["top1"] > best["top1"]:
                best = history[-1]
                if accelerator.is_main_process:
                    export_backbone(unwrapped, run_dir / "best", model_name, model_kwargs,
                                               {"finetuned_from": cfg.model.backbone, **best})
                accelerator.wait_for_everyone()
    bar.close()
    log.close()
    skipped = {"train": skip_totals(accelerator, train_skipped), "val": val_skipped}
    accelerator.print(f"fine-tune data: {n_train} train images ({describe_skipped(skipped['train'])} while drawing "
                      f"batches), {int(best['n'])} val images ({describe_skipped(skipped['val'])})")
    if accelerator.is_main_process:
        summary = {"best": best, "history": history, "num_classes": num_classes, "n_train": n_train,
                   "skipped": skipped}
        (run_dir / "finetune.json").write_text(json.dumps(summary, indent=2) + "\n")
    return FinetuneResult(run_dir, last, best, run_dir / "best" / "backbone.safetensors")
