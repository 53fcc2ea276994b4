"""The shared backbone: a timm VisionTransformer, built and encoded the one way every method uses."""
