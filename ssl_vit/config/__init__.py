"""Typed, closed configuration: the schema machinery, the pretraining and fine-tuning configs, recipe lookup."""
