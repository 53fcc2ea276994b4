"""The objectives' config sections (`mae:`, `dino:`, `dinov2:`); each field's comment is its documentation
(docs/config.md is generated from them)."""

from __future__ import annotations

from dataclasses import dataclass


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
    use_bn_in_head: bool = False  # BatchNorm (batch statistics) in the head's hidden layers, DINO's use_bn_in_head
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
    gram_loss_weight: float = 0.0  # Gram anchoring (DINOv3) of patch features to the starting backbone's; 0 = off


@dataclass(frozen=True)
class DINOv2Config(DINOConfig):
    """DINO's keys plus iBOT, KoLeo and Sinkhorn-Knopp (Oquab et al. 2023); DINOv2's defaults where they differ
    (its ssl_default_config.yaml, where an epoch is 1250 steps)."""

    norm_last_layer: bool = False  # DINOv2's head trains the last layer's weight-norm gain
    momentum_teacher: float = 0.992  # teacher EMA momentum at step 0, cosine-increased to 1
    warmup_teacher_temp_steps: int = 37_500  # linear teacher-temperature warmup (30 epochs of 1250 steps)
    freeze_last_layer_steps: int = 1250  # steps with the heads' last layers frozen (1 epoch of 1250 steps)
    global_crops_scale: tuple[float, float] = (0.32, 1.0)  # area range of the 2 global crops (size: model.img_size)
    local_crops_number: int = 8  # small crops seen by the student only
    local_crops_scale: tuple[float, float] = (0.05, 0.32)  # area range of the local crops
    centering: str = "sinkhorn_knopp"  # teacher targets of both losses: Sinkhorn-Knopp or softmax(out - EMA center)
    sinkhorn_iterations: int = 3  # Sinkhorn-Knopp normalisation rounds
    koleo_loss_weight: float = 0.1  # KoLeo on the student's cls features of each global crop; 0 = off
    ibot_loss_weight: float = 1.0  # iBOT masked-patch loss; 0 = off (no masking)
    mask_sample_probability: float = 0.5  # share of the global crops the student sees masked
    mask_ratio_range: tuple[float, float] = (0.1, 0.5)  # share of patches masked, spread over the masked crops
    mask_shape: str = "random"  # masked patches: random ones, or block (BEiT's rectangles, DINOv2's MaskingGenerator)
    ibot_separate_head: bool = False  # a head of its own for the patch tokens; false: share the cls (DINO) head
    ibot_out_dim: int = 65536  # separate iBOT head: prototypes
    ibot_hidden_dim: int = 2048  # separate iBOT head: MLP hidden width
    ibot_bottleneck_dim: int = 256  # separate iBOT head: bottleneck width
    ibot_head_layers: int = 3  # separate iBOT head: MLP layers before the bottleneck
