"""Data layer: WebDataset shards in (train and eval streams), image folders out (shard writer), demo data."""

from ssl_vit.data.demo import DEMO_CLASSES, DemoData, ensure_demo_data
from ssl_vit.data.samples import SKIP_REASONS, SampleError, decode_sample
from ssl_vit.data.shard_urls import resolve_shards
from ssl_vit.data.shards import eval_stream, train_stream
from ssl_vit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, crop_flip, denormalize, eval_transform
from ssl_vit.data.writer import ShardSummary, write_samples, write_shards

__all__ = [
    "DEMO_CLASSES", "DemoData", "ensure_demo_data",
    "SKIP_REASONS", "SampleError", "decode_sample", "eval_stream", "resolve_shards", "train_stream",
    "IMAGENET_MEAN", "IMAGENET_STD", "crop_flip", "denormalize", "eval_transform",
    "ShardSummary", "write_samples", "write_shards",
]
