"""Benchmark tools (`ssl-vit benchmark`, `benchmark-suite`); the core package never imports them."""
