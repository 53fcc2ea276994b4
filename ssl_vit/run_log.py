"""Where a run's numbers go: TensorBoard (curves, images) and a JSONL file (one object per log step)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from torch import Tensor


class RunLog:
    """Scalars to TensorBoard and `log.jsonl`, images to TensorBoard. A no-op on non-main ranks."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, purge_step: int | None = None) -> None:
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import

        run_dir = Path(run_dir)
        # purge_step drops events a killed run logged after its last checkpoint, so curves don't fold back.
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step or None)
        path = run_dir / "log.jsonl"
        if purge_step is not None and path.is_file():  # the same for the JSONL log
            kept = [line for line in path.read_text().splitlines(keepends=True)
                    if json.loads(line)["step"] <= purge_step]
            path.write_text("".join(kept))
        self.jsonl = path.open("a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **values}) + "\n")
        self.jsonl.flush()

    def image(self, step: int, tag: str, image: Tensor) -> None:
        """`image`: (3, H, W) in [0, 1]."""
        if self.enabled:
            self.writer.add_image(tag, image.detach().cpu(), step)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
