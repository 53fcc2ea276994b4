"""The pretraining config: frozen dataclasses (defaults: the MAE paper's ViT-B/16; the comment beside each field
is its docs/config.md entry), loaded from a YAML recipe and `--set` overrides and checked once, at load."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ssl_vit.config import checks
from ssl_vit.config.methods import DINOConfig, DINOv2Config, MAEConfig

# ConfigError and to_dict are part of this module's interface (most callers import them from here)
from ssl_vit.config.schema import ConfigError, load_dataclass, to_dict

__all__ = ["Config", "ConfigError", "DataConfig", "EvalConfig", "ModelConfig", "OptimConfig", "TrainConfig",
           "doubtful_settings", "dump_config", "load_config", "to_dict", "validate"]


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
    reg_tokens: int = 0  # register tokens (Darcet et al. 2023: 4), left out of every feature; 0: the timm model's own
    layer_scale_init: float | None = None  # LayerScale's initial gain (DINOv2: 1e-5); null: the timm model's own
    init: str = ""  # weights to start from: timm file, hf-hub:org/name, export or run dir/checkpoint; "" = random
    init_strict: bool = True  # model.init must fit exactly; false: what fits loads, the rest keeps its fresh init


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
    backbone_lr_scale: float = 1.0  # the backbone's lr = this × the scheduled lr (the method's own parts: × 1)
    layer_decay: float = 1.0  # backbone layer-wise lr decay (MAE's): block i of L (from 0) × decay^(L - i)


@dataclass(frozen=True)
class TrainConfig:
    run_dir: str = "runs/mae"  # outputs: config.yaml, log.jsonl, tensorboard/, checkpoints/, backbone.*
    total_steps: int = 250_228  # optimizer steps (800 epochs of ImageNet-1k's 1,281,167 images at batch 4096)
    warmup_steps: int = 12_511  # linear warmup steps (40 epochs at batch 4096)
    freeze_backbone_steps: int = 0  # first optimizer steps that train only the method's own parts (heads, decoder)
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
    objective: str = "mae"  # pretext objective: mae | dino | dinov2
    model: ModelConfig = field(default_factory=ModelConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)
    dino: DINOConfig = field(default_factory=DINOConfig)
    dinov2: DINOv2Config = field(default_factory=DINOv2Config)
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
    checks.check_values(cfg, CHOICES, RANGES, NOTES, SCALES)
    _check_architecture(cfg)
    _check_init(cfg.model.init)
    _check_data(cfg)


def doubtful_settings(cfg: Config) -> list[str]:
    """Valid but probably not meant (a smoke test or a run to be extended may mean them), one line each, for a
    command to show once before it trains; not in `validate`, which every load of a run's config.yaml repeats."""
    t, doubts = cfg.train, []
    if t.warmup_steps >= t.total_steps:
        doubts.append(f"train.warmup_steps {t.warmup_steps} >= train.total_steps {t.total_steps}: the lr never gets "
                      "out of warmup (it stays below its peak for the whole run)")
    if t.freeze_backbone_steps >= t.total_steps:
        doubts.append(f"train.freeze_backbone_steps {t.freeze_backbone_steps} >= train.total_steps {t.total_steps}: "
                      "the backbone never trains, only the method's own parts do")
    method = getattr(cfg, cfg.objective)
    if not cfg.model.init and t.freeze_backbone_steps:
        doubts.append(f"train.freeze_backbone_steps {t.freeze_backbone_steps} without model.init: the backbone "
                      "stays at its random init for those steps")
    if not cfg.model.init and getattr(method, "gram_loss_weight", 0):
        doubts.append(f"{cfg.objective}.gram_loss_weight {method.gram_loss_weight} without model.init: the Gram "
                      "anchor is the random initial backbone")
    return doubts


SCALES = ("mae.crop_scale", "dino.global_crops_scale", "dino.local_crops_scale",  # RandomResizedCrop area ranges
          "dinov2.global_crops_scale", "dinov2.local_crops_scale", "dinov2.mask_ratio_range")
CHOICES = {"objective": ("mae", "dino", "dinov2"), "train.precision": (None, "no", "fp16", "bf16", "auto"),
           "eval.pool": ("cls", "avg"), "dinov2.centering": ("sinkhorn_knopp", "softmax"),
           "dinov2.mask_shape": ("random", "block")}

# Every number whose nonsense values would not fail on their own but train wrongly or crash late, as the error
# shows the interval; null (where a key takes it) always passes, and NOTES says what it (or 0) means.
RANGES = {
    **dict.fromkeys(("model.img_size", "model.patch_size", "model.embed_dim", "model.depth", "model.num_heads",
                     "mae.decoder_dim", "mae.decoder_heads", "dino.hidden_dim", "dino.bottleneck_dim",
                     "dino.head_layers", "dino.local_crops_size", "data.max_image_pixels", "train.total_steps",
                     "eval.knn_k", "eval.batch_size"), "[1, inf)"),
    **dict.fromkeys(("mae.decoder_depth", "dino.warmup_teacher_temp_steps", "dino.freeze_last_layer_steps",
                     "dino.local_crops_number", "optim.weight_decay_end", "train.warmup_steps", "train.image_every",
                     "train.save_every", "eval.num_workers", "train.freeze_backbone_steps", "dino.gram_loss_weight"),
                    "[0, inf)"),
    "optim.backbone_lr_scale": "(0, inf)",  # a backbone that must not move: train.freeze_backbone_steps
    "optim.layer_decay": "(0, 1]",
    **dict.fromkeys(("dino.student_temp", "dino.teacher_temp", "dino.warmup_teacher_temp", "eval.knn_temperature"),
                    "(0, inf)"),
    **dict.fromkeys(("dino.momentum_teacher", "dino.color_jitter_prob", "dino.grayscale_prob", "dino.blur_probs",
                     "dino.solarize_prob", "data.max_skip_rate"), "[0, 1]"),
    "model.drop_path_rate": "[0, 1)",  # 1 drops every block and divides by keep-probability 0
    "model.reg_tokens": "[0, inf)", "model.layer_scale_init": "(0, inf)",  # timm skips LayerScale at 0
    "mae.mask_ratio": "(0, 1)",  # 0 masks no patch: the loss over masked patches is 0 / 0
    "dino.out_dim": "[2, inf)",  # a softmax over one prototype is 1 whatever the image
    "dino.center_momentum": "[0, 1)",  # 1 never moves the center from 0
    "eval.crop_ratio": "(0, 1]", **checks.SHARED_RANGES,
}
# dinov2.* holds every dino.* key, under the same intervals, and its own
RANGES |= {"dinov2." + key.removeprefix("dino."): value for key, value in RANGES.items() if key.startswith("dino.")}
RANGES |= {**dict.fromkeys(("dinov2.sinkhorn_iterations", "dinov2.ibot_hidden_dim", "dinov2.ibot_bottleneck_dim",
                            "dinov2.ibot_head_layers"), "[1, inf)"),
           "dinov2.koleo_loss_weight": "[0, inf)", "dinov2.ibot_loss_weight": "[0, inf)",
           "dinov2.mask_sample_probability": "(0, 1]", "dinov2.ibot_out_dim": "[2, inf)"}
NOTES = {**checks.SHARED_NOTES, "optim.weight_decay_end": "or null: constant",
         "model.reg_tokens": "0: the timm model's own, none for plain ViTs",
         "model.layer_scale_init": "or null: the timm model's own, none for plain ViTs",
         **dict.fromkeys(("model.embed_dim", "model.depth", "model.num_heads"), "or null: the timm model's own"),
         "train.warmup_steps": "0: no warmup", "train.image_every": "0: never", "optim.layer_decay": "1: off",
         "train.freeze_backbone_steps": "0: none", "dino.gram_loss_weight": "0: off",
         "dinov2.gram_loss_weight": "0: off",
         "train.save_every": "0: only at the end", "eval.num_workers": "0: load in the evaluating process"}


def _check_architecture(cfg: Config) -> None:
    """What timm and the objectives would assert (or divide by) when the model is built or first sees a batch."""
    m = cfg.model
    if m.img_size % m.patch_size:  # also the DINO global crops, whose size it is
        raise ConfigError(f"model.img_size {m.img_size} is not a multiple of model.patch_size {m.patch_size}")
    width, heads = m.embed_dim, m.num_heads
    if (width is None) != (heads is None):  # one is the timm model's own: ask timm (only then: it is slow)
        own = checks.timm_width_and_heads(m.name)
        width, heads = (width or own[0], heads or own[1]) if own else (None, None)
    for key, n, dim_key, dim in (("model.num_heads", heads, "model.embed_dim", width),
                                 ("mae.decoder_heads", cfg.mae.decoder_heads, "mae.decoder_dim", cfg.mae.decoder_dim)):
        if n is not None and dim is not None and dim % n:  # attention splits the width evenly (timm asserts it)
            raise ConfigError(f"{key}: {n} heads do not divide {dim_key} {dim} evenly")
    if cfg.mae.decoder_dim % 4:  # the decoder's fixed 2-D sin-cos position embedding: sin and cos of rows, cols
        raise ConfigError(f"mae.decoder_dim: must be a multiple of 4 (sin-cos position embedding), "
                          f"got {cfg.mae.decoder_dim}")
    if cfg.objective == "mae":
        _check_mae_grid(m.img_size // m.patch_size, cfg.mae.mask_ratio)
        if width is not None and width % 4:  # MAE fixes the encoder's position embedding to sin-cos as well
            raise ConfigError(f"model.embed_dim: MAE's sin-cos position embedding needs a multiple of 4, got {width}")
        return
    sec, d = cfg.objective, getattr(cfg, cfg.objective)  # DINOv2's section holds DINO's keys
    if d.local_crops_number and d.local_crops_size > m.img_size:
        raise ConfigError(f"{sec}.local_crops_size: must be at most model.img_size {m.img_size} (local crops are "
                          f"the small ones), got {d.local_crops_size}")
    if d.local_crops_number and d.local_crops_size % m.patch_size:  # timm asserts it
        raise ConfigError(f"{sec}.local_crops_size: must be a multiple of model.patch_size {m.patch_size} (the ViT "
                          f"cuts each crop into whole patches), got {d.local_crops_size}")
    if d.use_bn_in_head:
        _check_bn_rows(cfg, d, sec)


def _check_bn_rows(cfg: Config, d: DINOConfig, sec: str) -> None:
    """BatchNorm in a head normalises over the rows it gets in a step: one row raises mid-run, two give ±1."""
    b = cfg.data.batch_size
    if b < 2:  # the teacher's head sees the 2 global crops of each image: 2 rows at batch 1
        raise ConfigError(f"{sec}.use_bn_in_head: BatchNorm over the head's rows needs data.batch_size >= 2 per "
                          f"process, got {b}")
    if isinstance(d, DINOv2Config) and d.ibot_separate_head and d.ibot_loss_weight:
        masked = int(2 * b * d.mask_sample_probability)  # masked crops a step, at least one patch each
        if masked < 2:
            raise ConfigError(f"{sec}.use_bn_in_head: the separate iBOT head sees the masked patches only, as few as "
                              f"{masked} a step (int(2 x data.batch_size {b} x mask_sample_probability "
                              f"{d.mask_sample_probability})); BatchNorm needs 2: raise either")


def _check_init(init: str) -> None:
    """The form only: whether the weights are there is asked when a new run starts (a resume does not need them)."""
    if init.strip() != init:
        raise ConfigError(f"model.init: {init!r} starts or ends with blanks")
    if init.startswith("hf-hub:") and init.removeprefix("hf-hub:").partition("@")[0].count("/") != 1:
        raise ConfigError(f"model.init: {init!r} is no hub id; write hf-hub:org/name, "
                          "e.g. hf-hub:timm/vit_small_patch14_dinov2.lvd142m")


def usable_mask_ratios(length: int) -> tuple[float, float]:
    """(a ratio that hides one patch, the highest that keeps one) of a grid of `length` >= 2 patches, by MAE's own
    count of kept patches, `int(length * (1 - ratio))` (`random_masking`), float rounding included."""
    def kept(ratio: float) -> int:
        return int(length * (1 - ratio))

    high = 1 - 1 / length
    while kept(high) < 1:
        high = math.nextafter(high, 0)
    while kept(math.nextafter(high, 1)) >= 1:
        high = math.nextafter(high, 1)
    return 1 / length, high


def _check_mae_grid(side: int, ratio: float) -> None:
    """MAE encodes the kept patches and scores the hidden ones: it needs at least one of each."""
    length, kept = side * side, int(side * side * (1 - ratio))
    grid = f"{side}x{side}={length}-patch grid"
    if length < 2:
        raise ConfigError(f"model.patch_size: a {grid} leaves MAE no patch to hide besides the one it sees; use a "
                          "smaller patch or a larger model.img_size")
    low, high = usable_mask_ratios(length)
    if kept < 1:
        raise ConfigError(f"mae.mask_ratio={ratio!r} leaves no visible patch of the {grid}: the highest usable "
                          f"ratio is {high!r}")
    if kept >= length:
        raise ConfigError(f"mae.mask_ratio={ratio!r} hides no patch of the {grid} (the loss is over hidden "
                          f"patches): hide at least one, {low!r}")


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
    """Write the resolved config (`load_config(path)` gives it back), atomically: export and resume rebuild the
    model from a run dir's config.yaml, so a write killed half-way must leave the old one whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    os.replace(tmp, path)
