"""Where a run's numbers go: TensorBoard (curves, images) and a JSONL file (one object per log step)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from torch import Tensor


class RunLog:
    """Scalars to TensorBoard and `log.jsonl`, images to TensorBoard. A no-op on non-main ranks."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, resume_step: int | None = None) -> None:
        """`resume_step`: the step a training run goes on from; what a killed run logged after it is dropped, so
        curves don't fold back. None: a log appended to as it is (evaluations)."""
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter  # imported here: tensorboard is slow to import

        run_dir = Path(run_dir)
        # TensorBoard hides the events at purge_step and after: the next step, not the checkpoint's own
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)
        path = run_dir / "log.jsonl"
        if resume_step is not None and path.is_file():  # the same for the JSONL log
            path.write_text("".join(line for line in path.read_text(errors="replace").splitlines(keepends=True)
                                    if _logged_step(line) <= resume_step))
        self.jsonl = path.open("a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        # strict JSON: a NaN/inf (the loss of a window of skipped updates) is null there; TensorBoard keeps it
        finite = {tag: value if math.isfinite(value) else None for tag, value in values.items()}
        self.jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **finite}) + "\n")
        self.jsonl.flush()

    def image(self, step: int, tag: str, image: Tensor) -> None:
        """`image`: (3, H, W) in [0, 1]."""
        if self.enabled:
            self.writer.add_image(tag, image.detach().cpu(), step)

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def _logged_step(line: str) -> float:
    """The step of a log.jsonl line; infinite (dropped on resume) for a line a crash tore or a hand garbled."""
    try:
        step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
    return step if isinstance(step, int) else math.inf
