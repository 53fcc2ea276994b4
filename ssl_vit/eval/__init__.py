"""Evaluation of pretrained backbones: features (+ cache), k-NN, linear probe, fine-tuning, attention maps and
reconstructions."""
