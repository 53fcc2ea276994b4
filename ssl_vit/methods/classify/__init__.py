"""Fine-tuning as a method: a timm classifier on the exported backbone, mixup/cutmix soft targets, layer decay."""
