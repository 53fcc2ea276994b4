"""DINOv2: DINO's cls-token self-distillation plus iBOT's masked-patch loss, KoLeo and Sinkhorn-Knopp (Oquab et al.)."""
