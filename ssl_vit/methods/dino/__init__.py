"""DINO: self-distillation with an EMA teacher, multi-crop, centering and temperatures (Caron et al., 2021)."""
