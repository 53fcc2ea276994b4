"""The run log on resume: what a killed run logged after its checkpoint is dropped, the checkpoint step kept."""

import json
import math

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ssl_vit.training.run_log import RunLog


def _tensorboard_steps(run_dir):
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return [event.step for event in events.Scalars("train/loss")]


def test_resume_keeps_the_checkpoint_step_and_drops_what_came_after(tmp_path):
    log = RunLog(tmp_path)
    for step in (20, 40, 50, 60):  # checkpoint at 50 (logged just before saving), killed after 60
        log.scalars(step, {"train/loss": float(step)})
    log.close()
    with (tmp_path / "log.jsonl").open("ab") as f:
        f.write(b'\x00\xffnot text\n{"step": "x"}\n')  # garbled by hand: dropped, not a crash
        f.write(b'{"step": 70, "train/lo')  # the crash tore the last line
    resumed = RunLog(tmp_path, resume_step=50)
    resumed.scalars(80, {"train/loss": 80.0})
    resumed.close()
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [20, 40, 50, 80]
    assert _tensorboard_steps(tmp_path) == [20, 40, 50, 80]


def test_a_restart_before_the_first_checkpoint_starts_the_log_afresh(tmp_path):
    log = RunLog(tmp_path)
    for step in (20, 40):  # killed before its first checkpoint
        log.scalars(step, {"train/loss": float(step)})
    log.close()
    restarted = RunLog(tmp_path, resume_step=0)
    restarted.scalars(20, {"train/loss": 1.0})
    restarted.close()
    assert [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()] == [20]
    assert _tensorboard_steps(tmp_path) == [20]


def test_a_nan_is_null_in_the_jsonl_log_and_nan_in_tensorboard(tmp_path):
    log = RunLog(tmp_path)
    log.scalars(5, {"train/loss": float("nan")})
    log.close()

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    line = json.loads((tmp_path / "log.jsonl").read_text(), parse_constant=refuse)
    assert line["step"] == 5 and line["train/loss"] is None
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert math.isnan(events.Scalars("train/loss")[0].value)
