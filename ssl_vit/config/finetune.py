"""The fine-tuning config, on the same machinery as `pretrain.py`. Defaults: MAE's ViT-B/16 fine-tuning recipe
(its FINETUNE.md and main_finetune.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ssl_vit.config import checks
from ssl_vit.config.schema import ConfigError, load_dataclass


@dataclass(frozen=True)
class FTModelConfig:
    backbone: str = ""  # exported backbone: run dir or backbone.safetensors (with backbone.json beside it)
    random_init: bool = False  # same architecture, untrained: the baseline a pretrained backbone must beat
    pool: str = "avg"  # avg: mean patch token + fresh LayerNorm (MAE's global pool) | cls: the cls token
    drop_path_rate: float = 0.1  # stochastic depth (MAE: 0.1 ViT-B, 0.2 ViT-L)
    head_init_std: float = 2e-5  # classifier weights ~ N(0, std²), bias 0 (MAE)


@dataclass(frozen=True)
class FTDataConfig:
    train: str = ""  # labelled train shards; "" = the built-in demo's labelled k-NN train split
    val: str = ""  # labelled val shards; "" = the built-in demo's k-NN val split
    train_size: int | None = None  # samples per epoch; None = counted from the tar headers (local shards)
    num_classes: int | None = None  # None = lines of classes.txt beside the train (else val) shards
    batch_size: int = 32  # per-device batch; global batch = batch_size × processes × accum_steps
    num_workers: int = 10  # loader processes per rank
    shuffle_buffer: int = 5000  # samples held per worker for shuffling across shards
    crop_ratio: float = 0.875  # eval: resize to img_size / crop_ratio, centre-crop img_size
    allow_pipe: bool = False  # allow `pipe:` shard URLs; they run a shell command


@dataclass(frozen=True)
class FTAugmentConfig:
    auto_augment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment policy string; "" = none
    color_jitter: float = 0.0  # colour jitter strength (timm applies it only without auto_augment)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range
    reprob: float = 0.25  # random-erasing probability
    remode: str = "pixel"  # random-erasing fill: pixel (per-pixel noise) | rand | const
    recount: int = 1  # random-erasing boxes per image
    mixup: float = 0.8  # mixup alpha; 0 = off
    cutmix: float = 1.0  # cutmix alpha; 0 = off
    mixup_prob: float = 1.0  # probability of mixup or cutmix per batch
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    mixup_mode: str = "batch"  # batch | pair | elem
    smoothing: float = 0.1  # label smoothing


@dataclass(frozen=True)
class FTOptimConfig:
    base_lr: float = 5e-4  # lr = base_lr × global batch / 256 (linear scaling rule)
    lr: float | None = None  # absolute peak lr; overrides base_lr scaling when set
    min_lr: float = 1e-6  # floor of the cosine decay
    weight_decay: float = 0.05  # AdamW decay on weights (never on 1-D params, cls token, position embedding)
    layer_decay: float = 0.65  # layer-wise lr decay: block i of L gets lr × decay^(L + 1 - i) (0.75 for ViT-L)
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    clip_grad: float | None = None  # global grad-norm clip; None = no clipping
    accum_steps: int = 1  # micro-batches accumulated per optimizer step


@dataclass(frozen=True)
class FTTrainConfig:
    run_dir: str = "runs/finetune"  # outputs: config.yaml, log.jsonl, tensorboard/, checkpoints/, best/, finetune.json
    epochs: int = 100  # passes over train_size samples
    warmup_epochs: int = 5  # linear lr warmup
    max_steps: int | None = None  # stop after this many optimizer steps (smoke tests); None = all epochs
    precision: str | None = None  # null: the launcher's --mixed_precision (or no) | no | fp16 | bf16
    seed: int = 0  # base seed; each rank and loader worker derives its own
    log_every: int = 20  # optimizer steps between scalar logs
    keep_last: int = 2  # complete checkpoints (one per epoch end) kept on disk; 0 = keep all
    max_nonfinite_steps: int = 20  # consecutive steps skipped for a NaN/inf loss or grad norm before stopping


@dataclass(frozen=True)
class FinetuneConfig:
    model: FTModelConfig = field(default_factory=FTModelConfig)
    data: FTDataConfig = field(default_factory=FTDataConfig)
    augment: FTAugmentConfig = field(default_factory=FTAugmentConfig)
    optim: FTOptimConfig = field(default_factory=FTOptimConfig)
    train: FTTrainConfig = field(default_factory=FTTrainConfig)


def load_finetune_config(recipe: str | Path | None = None,
                         overrides: list[str] | tuple[str, ...] = ()) -> FinetuneConfig:
    """Defaults ← recipe (if any) ← `key=value` overrides, validated into a frozen FinetuneConfig."""
    cfg = load_dataclass(FinetuneConfig, recipe, overrides)
    checks.check_values(cfg, CHOICES, RANGES, NOTES, ("augment.crop_scale",))
    if not 0 <= cfg.train.warmup_epochs <= cfg.train.epochs:
        raise ConfigError(f"train.warmup_epochs: must be in [0, train.epochs], got {cfg.train.warmup_epochs}")
    if cfg.data.num_classes == 1:
        raise ConfigError("data.num_classes: 1 class leaves nothing to tell apart (the loss is 0 whatever the image); "
                          "give at least 2, or null for classes.txt")
    if (cfg.augment.mixup > 0 or cfg.augment.cutmix > 0) and cfg.data.batch_size % 2:
        raise ConfigError(f"data.batch_size: mixup/cutmix pair images, so it must be even, got {cfg.data.batch_size}")
    checks.check_auto_augment(cfg.augment.auto_augment)
    return cfg


CHOICES = {"model.pool": ("avg", "cls"), "augment.remode": ("pixel", "rand", "const"),
           "augment.mixup_mode": ("batch", "pair", "elem"), "train.precision": (None, "no", "fp16", "bf16")}

# As in pretrain.py: intervals as the error shows them; null (where a key takes it) always passes.
RANGES = {
    "model.drop_path_rate": "[0, 1)", "model.head_init_std": "[0, inf)",
    # 0 is no size and no class, not "auto": null is auto, as the docs say
    "data.train_size": "[1, inf)", "data.num_classes": "[1, inf)", "data.crop_ratio": "(0, 1]",
    "augment.color_jitter": "[0, inf)", "augment.reprob": "[0, 1]", "augment.recount": "[1, inf)",
    "augment.mixup": "[0, inf)", "augment.cutmix": "[0, inf)",  # Beta(α, α) parameters; 0 = off
    "augment.mixup_prob": "[0, 1]", "augment.mixup_switch_prob": "[0, 1]",
    "augment.smoothing": "[0, 1)",  # 1 spreads every label uniformly: nothing left to learn
    **checks.SHARED_RANGES, "optim.layer_decay": "(0, 1]",
    "train.epochs": "[1, inf)", "train.max_steps": "[1, inf)",  # no step, no evaluation: nothing to report
}
NOTES = {"data.train_size": "or null: counted from the tar headers",
         "data.num_classes": "or null: lines of classes.txt beside the train or val shards",
         "train.max_steps": "or null for every epoch", **checks.SHARED_NOTES}
