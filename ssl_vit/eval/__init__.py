"""Evaluation of frozen backbones: feature extraction and k-NN."""
