"""ssl_vit: self-supervised pretraining of Vision Transformers."""
