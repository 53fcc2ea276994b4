"""Evaluation of pretrained backbones: features (+ cache), k-NN, linear probe, fine-tuning, attention and MAE
visualisations."""
