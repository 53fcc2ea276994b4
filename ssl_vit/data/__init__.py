"""Data layer: WebDataset shards in (train and eval streams), image folders out (shard writer), demo data."""
