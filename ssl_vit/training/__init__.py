"""The one Accelerate training loop and what it needs: optimizer and schedules, checkpoints, resume, monitoring,
stop signals, distributed set-up. It never learns which method it runs."""
