"""Typed, closed configuration: frozen dataclasses, YAML recipes as deltas, `--set a.b=value` overrides.

Defaults are the MAE paper's ViT-B/16 pretraining values; a recipe lists only what differs. Any unknown key
is an error naming the closest valid one, and any value of the wrong type is an error naming key and type
(schema.py, on OmegaConf); a value out of its range or choices is one too (`validate`, once, at load).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ssl_vit.config import checks

# ConfigError and to_dict are part of this module's interface (most callers import them from here)
from ssl_vit.config.schema import ConfigError, load_dataclass, to_dict

__all__ = ["Config", "ConfigError", "DataConfig", "DINOConfig", "EvalConfig", "MAEConfig", "ModelConfig",
           "OptimConfig", "TrainConfig", "doubtful_settings", "dump_config", "load_config", "to_dict", "validate"]


@dataclass(frozen=True)
class ModelConfig:
    name: str = "vit_base_patch16_224"  # any timm ViT name; the fields below override its defaults
    img_size: int = 224  # input resolution of the (global) views
    patch_size: int = 16  # patch side in pixels
    embed_dim: int | None = None  # token width; None keeps the timm model's own
    depth: int | None = None  # number of transformer blocks; None keeps the timm model's own
    num_heads: int | None = None  # attention heads; None keeps the timm model's own
    drop_path_rate: float = 0.0  # stochastic depth (MAE pretraining uses none; DINO 0.1)
    grad_checkpointing: bool = False  # recompute block activations in backward to save memory


@dataclass(frozen=True)
class MAEConfig:
    mask_ratio: float = 0.75  # share of patches hidden from the encoder, drawn per sample
    decoder_dim: int = 512  # decoder token width
    decoder_depth: int = 8  # decoder blocks
    decoder_heads: int = 16  # decoder attention heads
    norm_pix_loss: bool = True  # regress per-patch normalised pixels (the paper's better target)
    crop_scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range of the training view


@dataclass(frozen=True)
class DINOConfig:
    out_dim: int = 65536  # prototypes: width of the head's weight-normalised last layer
    hidden_dim: int = 2048  # head MLP hidden width
    bottleneck_dim: int = 256  # head output before L2 normalisation and the last layer
    head_layers: int = 3  # MLP layers before the bottleneck
    norm_last_layer: bool = True  # fix the last layer's weight-norm gain at 1 (more stable)
    student_temp: float = 0.1  # student softmax temperature
    teacher_temp: float = 0.07  # teacher softmax temperature after warmup
    warmup_teacher_temp: float = 0.04  # teacher temperature at step 0
    warmup_teacher_temp_steps: int = 37_530  # linear teacher-temperature warmup (30 epochs at batch 1024)
    center_momentum: float = 0.9  # EMA momentum of the teacher-output center
    momentum_teacher: float = 0.996  # teacher EMA momentum at step 0, cosine-increased to 1
    freeze_last_layer_steps: int = 1251  # steps with the head's last layer frozen (1 epoch at batch 1024)
    global_crops_scale: tuple[float, float] = (0.4, 1.0)  # area range of the 2 global crops (size: model.img_size)
    local_crops_number: int = 10  # small crops seen by the student only
    local_crops_size: int = 96  # local crop side in pixels
    local_crops_scale: tuple[float, float] = (0.05, 0.4)  # area range of the local crops
    color_jitter_prob: float = 0.8  # ColorJitter(0.4, 0.4, 0.2, 0.1) probability, every view
    grayscale_prob: float = 0.2  # grayscale probability, every view
    blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5)  # Gaussian blur: global 1, global 2, each local
    solarize_prob: float = 0.2  # solarize probability, second global view only
    export_teacher: bool = True  # export (and evaluate) the teacher backbone, not the student


@dataclass(frozen=True)
class DataConfig:
    train: str = ""  # training shards: brace pattern, directory or .txt list; "" = built-in demo data
    batch_size: int = 64  # per-device batch; global batch = batch_size × processes × accum_steps
    num_workers: int = 4  # loader processes per rank (shards are split across ranks and workers)
    shuffle_buffer: int = 2000  # samples held per worker for shuffling across shard boundaries
    max_image_pixels: int = 89_478_485  # larger images are skipped as decompression bombs (PIL's default)
    allow_pipe: bool = False  # allow `pipe:` shard URLs; they run a shell command, so off by default
    max_skip_rate: float = 0.1  # stop the run when more than this share of samples was skipped (after 1000)
    device_aug: bool = False  # opt-in: CPU only resizes, crops/flip/colour run batched on the device (docs/data.md)
    device_decode: bool = False  # JPEGs decoded on the device (nvJPEG on GPU), workers read headers; needs device_aug


@dataclass(frozen=True)
class OptimConfig:
    base_lr: float = 1.5e-4  # lr = base_lr × global batch / 256 (linear scaling rule)
    lr: float | None = None  # absolute peak lr; overrides base_lr scaling when set
    min_lr: float = 0.0  # floor of the cosine decay
    weight_decay: float = 0.05  # AdamW decay on weights; never on 1-D params and tokens (MAE's code decays tokens)
    weight_decay_end: float | None = None  # cosine-schedule the decay to this value; None = constant
    betas: tuple[float, float] = (0.9, 0.95)  # AdamW betas (MAE uses β2 = 0.95)
    clip_grad: float | None = None  # global grad-norm clip; None = no clipping
    accum_steps: int = 1  # micro-batches accumulated per optimizer step


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/mae"  # outputs: config.yaml, log.jsonl, tensorboard/, checkpoints/, backbone.*
    total_steps: int = 250_228  # optimizer steps (800 epochs of ImageNet-1k's 1,281,167 images at batch 4096)
    warmup_steps: int = 12_511  # linear warmup steps (40 epochs at batch 4096)
    precision: str | None = None  # null: launcher's --mixed_precision or no | no | fp16 | bf16 | auto (bf16 on CUDA)
    seed: int = 0  # base seed; each rank and loader worker derives its own
    log_every: int = 20  # optimizer steps between scalar logs
    image_every: int = 1000  # optimizer steps between reconstruction grids in TensorBoard; 0 = never
    save_every: int = 5000  # optimizer steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # complete checkpoints kept on disk
    export: bool = True  # write backbone.safetensors + backbone.json at the end of the run
    max_nonfinite_steps: int = 20  # consecutive steps skipped for a NaN/inf loss or grad norm before stopping
    compile: bool = False  # torch.compile the encoder (one static graph per input shape); worth it on GPU


@dataclass(frozen=True)
class EvalConfig:
    knn_train: str = ""  # labelled shards for the k-NN memory bank; "" = none (the demo fills both)
    knn_val: str = ""  # labelled shards to classify; "" = none
    knn_k: int = 20  # neighbours that vote
    knn_temperature: float = 0.07  # votes are weighted by exp(cosine similarity / T)
    pool: str = "cls"  # feature: cls token or avg of patch tokens
    crop_ratio: float = 0.875  # resize the short side to img_size / crop_ratio, then centre-crop img_size
    batch_size: int = 256  # per-device batch during feature extraction
    num_workers: int = 4  # loader processes per rank during feature extraction


@dataclass(frozen=True)
class Config:
    objective: str = "mae"  # pretext objective: mae | dino
    model: ModelConfig = field(default_factory=ModelConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def load_config(recipe: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults ← recipe (if any) ← `key=value` overrides, validated into a frozen Config."""
    cfg = load_dataclass(Config, recipe, overrides)
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """The values OmegaConf's types let through but no run can use, each named by key."""
    checks.check_values(cfg, CHOICES, RANGES, NOTES)
    for key in SCALES:
        checks.check_scale(key, checks.lookup(cfg, key))
    checks.check_run_dir(cfg.train.run_dir)
    _check_architecture(cfg)
    _check_data(cfg)


def doubtful_settings(cfg: Config) -> list[str]:
    """Settings that are valid but probably not meant, one line each, for a command to show before it trains.
    Not errors: a smoke test (`--set train.total_steps=2` of a recipe) or a run to be extended on resume may
    mean them. Not warnings in `validate` either: every load of a run's config.yaml would repeat them."""
    t = cfg.train
    notes = []
    if t.warmup_steps >= t.total_steps:
        notes.append(f"train.warmup_steps {t.warmup_steps} >= train.total_steps {t.total_steps}: the lr never gets "
                     "out of warmup (it stays below its peak for the whole run)")
    return notes


SCALES = ("mae.crop_scale", "dino.global_crops_scale", "dino.local_crops_scale")  # RandomResizedCrop area ranges
CHOICES = {"objective": ("mae", "dino"), "train.precision": (None, "no", "fp16", "bf16", "auto"),
           "eval.pool": ("cls", "avg")}

# Every number whose nonsense values would not fail on their own but train wrongly or crash late. Intervals as
# the error shows them; null (where a key takes it) is always allowed, and NOTES says what it (or 0) means.
RANGES = {
    "model.img_size": "[1, inf)", "model.patch_size": "[1, inf)", "model.embed_dim": "[1, inf)",
    "model.depth": "[1, inf)", "model.num_heads": "[1, inf)",
    "model.drop_path_rate": "[0, 1)",  # 1 drops every block and divides by keep-probability 0
    "mae.mask_ratio": "(0, 1)",  # 0 masks no patch: the loss over masked patches is 0 / 0
    "mae.decoder_dim": "[1, inf)", "mae.decoder_depth": "[0, inf)", "mae.decoder_heads": "[1, inf)",
    "dino.out_dim": "[2, inf)",  # a softmax over one prototype is 1 whatever the image
    "dino.hidden_dim": "[1, inf)", "dino.bottleneck_dim": "[1, inf)",
    "dino.head_layers": "[1, inf)", "dino.student_temp": "(0, inf)", "dino.teacher_temp": "(0, inf)",
    "dino.warmup_teacher_temp": "(0, inf)", "dino.warmup_teacher_temp_steps": "[0, inf)",
    "dino.center_momentum": "[0, 1)",  # 1 never moves the center from 0
    "dino.momentum_teacher": "[0, 1]", "dino.freeze_last_layer_steps": "[0, inf)",
    "dino.local_crops_number": "[0, inf)", "dino.local_crops_size": "[1, inf)", "dino.color_jitter_prob": "[0, 1]",
    "dino.grayscale_prob": "[0, 1]", "dino.blur_probs": "[0, 1]", "dino.solarize_prob": "[0, 1]",
    "data.max_image_pixels": "[1, inf)", "data.max_skip_rate": "[0, 1]",
    **checks.SHARED_RANGES, "optim.weight_decay_end": "[0, inf)",
    "train.total_steps": "[1, inf)", "train.warmup_steps": "[0, inf)", "train.image_every": "[0, inf)",
    "train.save_every": "[0, inf)",
    "eval.knn_k": "[1, inf)", "eval.knn_temperature": "(0, inf)", "eval.crop_ratio": "(0, 1]",
    "eval.batch_size": "[1, inf)", "eval.num_workers": "[0, inf)",
}
NOTES = {**checks.SHARED_NOTES, "optim.weight_decay_end": "or null: constant",
         "model.embed_dim": "or null: the timm model's own", "model.depth": "or null: the timm model's own",
         "model.num_heads": "or null: the timm model's own", "train.warmup_steps": "0: no warmup",
         "train.image_every": "0: never", "train.save_every": "0: only at the end",
         "eval.num_workers": "0: load in the evaluating process"}


def _check_architecture(cfg: Config) -> None:
    """What timm and the objectives' heads would assert (or divide by) when the model is built."""
    m = cfg.model
    if m.img_size % m.patch_size:
        raise ConfigError(f"model.img_size {m.img_size} is not a multiple of model.patch_size {m.patch_size}")
    width, heads = m.embed_dim, m.num_heads
    if (width is None) != (heads is None):  # one is the timm model's own: ask timm (only then: it is slow)
        own = checks.timm_width_and_heads(m.name)
        width, heads = (width or own[0], heads or own[1]) if own else (None, None)
    if width is not None and heads is not None:
        checks.check_divides("model.num_heads", heads, "model.embed_dim", width)
    checks.check_divides("mae.decoder_heads", cfg.mae.decoder_heads, "mae.decoder_dim", cfg.mae.decoder_dim)
    if cfg.mae.decoder_dim % 4:  # the decoder's fixed 2-D sin-cos position embedding: sin and cos of rows, cols
        raise ConfigError(f"mae.decoder_dim: must be a multiple of 4 (sin-cos position embedding), "
                          f"got {cfg.mae.decoder_dim}")
    d = cfg.dino
    if cfg.objective == "dino" and d.local_crops_number and d.local_crops_size > m.img_size:
        raise ConfigError(f"dino.local_crops_size: must be at most model.img_size {m.img_size} (local crops are "
                          f"the small ones), got {d.local_crops_size}")


def _check_data(cfg: Config) -> None:
    if cfg.data.device_decode and not cfg.data.device_aug:
        raise ConfigError("data.device_decode: needs data.device_aug (the device decoder hands it uint8 squares)")
    if cfg.data.device_decode:
        from ssl_vit.data.device.decode import torchvision_decodes_jpeg  # the data package imports torch and PIL

        if not torchvision_decodes_jpeg():
            raise ConfigError("data.device_decode: this torchvision has no torchvision.io.decode_jpeg (its image "
                              "codecs moved to TorchCodec); use a torchvision that has it, or turn this off")
    ev = cfg.eval
    if bool(ev.knn_train) != bool(ev.knn_val):  # k-NN after training would be skipped without a word
        given, missing = ("eval.knn_train", "eval.knn_val") if ev.knn_train else ("eval.knn_val", "eval.knn_train")
        raise ConfigError(f"{missing}: empty while {given} is set; k-NN needs both (or neither)")


def dump_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config; loading it back with `load_config(path)` gives the same Config.

    Atomic (temp file, then rename): a run dir's config.yaml is what export and resume rebuild the model from,
    so a write killed half-way must leave the old one whole.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
