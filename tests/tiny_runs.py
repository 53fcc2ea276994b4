"""The tiny MAE model the end-to-end tests train (32 px, patch 8, width 48, 2 blocks): seconds a run on CPU."""

TINY_MAE = ["model.name=vit_tiny_patch16_224", "model.img_size=32", "model.patch_size=8", "model.embed_dim=48",
            "model.depth=2", "model.num_heads=2", "mae.decoder_dim=32", "mae.decoder_depth=1", "mae.decoder_heads=2"]
