"""MAE: random masking, a visible-only encoder, a light decoder, pixel loss (He et al., 2021)."""
