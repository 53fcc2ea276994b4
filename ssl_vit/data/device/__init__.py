"""Opt-in device-side augmentation and JPEG decode (`data.device_aug`, `data.device_decode`)."""
