"""Fault tolerance, provoked for real: signals, SIGKILL mid-save, NaN on one rank, bad data, malicious pickles."""

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import accelerate
import pytest
import torch
from accelerate.state import AcceleratorState
from conftest import run_group, wait_for
from tiny_runs import TINY_MAE

from ssl_vit.config.pretrain import load_config
from ssl_vit.data.demo import ensure_demo_data
from ssl_vit.methods.base import Objective
from ssl_vit.training.checkpoint import COMPLETE, complete_checkpoints, load_backbone
from ssl_vit.training.loop import pretrain
from ssl_vit.training.marker import write_marker
from ssl_vit.training.monitor import RunAborted

ROOT = Path(__file__).resolve().parent.parent
INJECT = str(ROOT / "tests" / "inject_fault.py")
TINY = TINY_MAE + [
    "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8", "optim.lr=1e-3",
    "train.warmup_steps=1", "train.log_every=1", "train.image_every=0", "train.export=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_data(tmp_path_factory.mktemp("demo"), n_train=60, n_knn_train=10, n_knn_val=10)


def sets(*items):
    return [a for kv in items for a in ("--set", kv)]


def logged_steps(run_dir):
    path = run_dir / "log.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def test_sigterm_stops_saves_and_rerun_continues(tmp_path, demo):
    run_dir = tmp_path / "run"
    argv = [sys.executable, INJECT, "none", str(tmp_path), "pretrain",
            *sets(*TINY, f"data.train={demo.train}", f"train.run_dir={run_dir}", "train.total_steps=100000",
                  "train.save_every=1000")]
    proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: len(logged_steps(run_dir)) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    [(step, path)] = complete_checkpoints(run_dir)
    assert f"stopped by SIGTERM after step {step}; checkpoint: {path}" in out
    assert logged_steps(run_dir)[-1] == step  # the stop step was logged before saving

    argv_again = argv[:-2] + ["--set", f"train.total_steps={step + 2}"]  # the same run, asked to end soon
    out = subprocess.run(argv_again, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert f"resumed from {path} (step {step})" in out.stdout
    assert logged_steps(run_dir)[-3:] == [step, step + 1, step + 2]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_to_the_whole_process_group_with_loader_workers(tmp_path, demo, stop):
    # Ctrl-C reaches the terminal's whole process group and SLURM every process of the step: the loader
    # workers get the signal too, and one that died of it crashed the training process instead of a clean stop
    run_dir = tmp_path / "run"
    argv = [sys.executable, "-m", "ssl_vit", "pretrain", "--no-knn",
            *sets(*TINY, "data.num_workers=2", f"data.train={demo.train}", f"train.run_dir={run_dir}",
                  "train.total_steps=100000", "train.save_every=1000")]
    proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group, as a terminal job has
    wait_for(lambda: len(logged_steps(run_dir)) >= 3, proc)
    os.killpg(proc.pid, stop)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    [(step, path)] = complete_checkpoints(run_dir)
    assert f"stopped by {stop.name} after step {step}; checkpoint: {path}" in out


def test_a_crash_with_loader_workers_exits_instead_of_waiting_on_them(tmp_path, demo):
    # at exit after an uncaught error Python terminates the daemon loader workers (SIGTERM from their parent) and
    # waits for them: workers that ignored every SIGTERM kept the process waiting forever
    argv = [sys.executable, INJECT, "crash", str(tmp_path), "pretrain", "--no-knn",
            *sets(*TINY, "data.num_workers=2", f"data.train={demo.train}", f"train.run_dir={tmp_path / 'run'}",
                  "train.total_steps=10")]
    out = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "injected crash in step 2" in out.stderr


def test_sigterm_to_one_rank_stops_both_at_the_same_step(tmp_path, demo, accelerate_launch):
    run_dir = tmp_path / "run"
    argv = accelerate_launch() + [INJECT, "none", str(tmp_path), "pretrain",
                     *sets(*TINY, f"data.train={demo.train}", f"train.run_dir={run_dir}",
                           "train.total_steps=100000", "train.save_every=1000")]
    proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        wait_for(lambda: len(logged_steps(run_dir)) >= 3, proc, timeout=180)
        ranks = subprocess.run(["pgrep", "-f", f"{INJECT} none {tmp_path}"], capture_output=True, text=True)
        workers = [int(p) for p in ranks.stdout.split() if int(p) != proc.pid]
        assert len(workers) == 2, ranks.stdout
        os.kill(max(workers), signal.SIGTERM)  # one rank only
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-3000:]
    [(step, path)] = complete_checkpoints(run_dir)
    # A checkpoint is a collective: both ranks wrote their RNG state for the same step.
    assert (path / "random_states_0.pkl").is_file() and (path / "random_states_1.pkl").is_file()
    assert "stopped by" in out and f"after step {step}" in out
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert records[0]["step"] == records[1]["step"] == step
    assert records[0]["params"] == records[1]["params"]


def test_sigkill_during_save_resumes_from_the_previous_checkpoint(tmp_path, demo):
    run_dir = tmp_path / "run"
    argv = [sys.executable, INJECT, "stall_save", str(tmp_path), "pretrain",
            *sets(*TINY, f"data.train={demo.train}", f"train.run_dir={run_dir}", "train.total_steps=6",
                  "train.save_every=2", "train.keep_last=3")]
    proc = subprocess.Popen(argv, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: (tmp_path / "saving").exists(), proc)
    proc.kill()  # SIGKILL while the step-4 checkpoint is half done
    proc.wait(timeout=30)
    assert [s for s, _ in complete_checkpoints(run_dir)] == [2]
    assert (run_dir / "checkpoints" / ".tmp_step_00000004").is_dir()  # the debris of the killed save

    argv[2] = "none"
    out = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "(step 2)" in out.stdout and "resumed from" in out.stdout
    assert [s for s, _ in complete_checkpoints(run_dir)] == [2, 4, 6]
    assert not list((run_dir / "checkpoints").glob(".tmp_*"))


def test_nan_on_one_rank_skips_the_update_everywhere(tmp_path, demo, accelerate_launch):
    """Also: unequal shard counts per rank (3 shards, 2 ranks), disjoint reads, equal steps, equal weights."""
    three = sorted(Path(demo.train.split("train-")[0]).glob("train-*.tar"))[:3]
    assert len(three) == 3
    listing = tmp_path / "three.txt"
    listing.write_text("".join(f"{path}\n" for path in three))
    run_dir = tmp_path / "run"
    argv = accelerate_launch() + [INJECT, "nan_rank1", str(tmp_path), "pretrain", "--no-knn",
                     *sets(*TINY, f"data.train={listing}", f"train.run_dir={run_dir}",
                           "train.total_steps=6", "train.save_every=3")]
    out = run_group(argv, cwd=ROOT, env=ENV, timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["train/nonfinite_steps"] for r in log] == [0, 0, 1, 2, 2, 2]
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert records[0]["step"] == records[1]["step"] == 6
    assert records[0]["params"] == records[1]["params"]  # no rank stepped on its own
    assert set(records[0]["drawn"]).isdisjoint(records[1]["drawn"])
    assert len(records[0]["drawn"]) == 2 and len(records[1]["drawn"]) == 1


def test_fp16_a_skipped_step_ends_the_grad_scalers_step(tmp_path, demo, monkeypatch):
    """Under fp16, clipping unscales the gradients (GradScaler.unscale_) every step. A step skipped for a NaN loss
    must still end the scaler's step, or the next step's unscale_ raises. Accelerate makes no fp16 scaler on CPU,
    so the test hands it torch's CPU GradScaler (the state machine CUDA's shares)."""
    original_init, original_call = accelerate.Accelerator.__init__, Objective.__call__
    scalers = []

    def with_scaler(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        if self.mixed_precision == "fp16":
            self.native_amp, self.scaler = True, torch.amp.GradScaler("cpu")
            scalers.append(self.scaler)

    def nan_at_step_1(self, batch, step):
        out = original_call(self, batch, step)
        return {**out, "loss": out["loss"] * float("nan")} if step == 1 else out

    monkeypatch.setattr(accelerate.Accelerator, "__init__", with_scaler)
    monkeypatch.setattr(Objective, "__call__", nan_at_step_1)
    run_dir = tmp_path / "run"
    cfg = load_config(None, TINY + [f"data.train={demo.train}", f"train.run_dir={run_dir}", "train.total_steps=4",
                                    "train.precision=fp16", "optim.clip_grad=1.0", "train.save_every=0"])
    # Accelerate keeps one process-wide state, whose precision cannot change: fp16 here only, then back
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        assert pretrain(cfg).step == 4
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["train/nonfinite_steps"] for r in log] == [0, 1, 1, 1]
    assert len(scalers) == 1 and scalers[0].get_scale() < 2.0**16  # the NaN step lowered the scale


def test_a_checkpoint_off_the_log_grid_counts_every_image_so_far(tmp_path, demo):
    """Images and skips are summed over ranks when a log window closes; a checkpoint closes the window too, or a
    resume from it would forget the images read since the last log step (and judge the skip rate on too few)."""
    run_dir = tmp_path / "run"
    cfg = load_config(None, TINY + [f"data.train={demo.train}", f"train.run_dir={run_dir}", "train.total_steps=6",
                                    "train.log_every=4", "train.save_every=3", "train.keep_last=2"])
    pretrain(cfg)
    markers = {step: json.loads((path / "COMPLETE").read_text()) for step, path in complete_checkpoints(run_dir)}
    assert {step: m["counters"]["images"] for step, m in markers.items()} == {3: 3 * 4, 6: 6 * 4}
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [3, 4, 6]


def test_consecutive_nans_stop_the_run_naming_the_last_good_checkpoint(tmp_path, demo):
    run_dir = tmp_path / "run"
    argv = [sys.executable, INJECT, "nan_always", str(tmp_path), "pretrain",
            *sets(*TINY, f"data.train={demo.train}", f"train.run_dir={run_dir}", "train.total_steps=20",
                  "train.max_nonfinite_steps=3")]
    out = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "stopped: 3 consecutive steps had a NaN/inf loss or gradient norm (up to step 3); last good " \
           "checkpoint: none" in out.stderr


def test_too_many_bad_samples_stop_the_run(tmp_path, monkeypatch):
    import io
    import tarfile

    from PIL import Image

    import ssl_vit.training.monitor as monitor

    monkeypatch.setattr(monitor, "SKIP_RATE_MIN_SAMPLES", 20)
    good = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 10, 10)).save(good, format="PNG")
    shard = tmp_path / "bad.tar"
    with tarfile.open(shard, "w") as tar:
        for i in range(40):
            data = good.getvalue() if i % 2 else b"\x89PNG not really"
            info = tarfile.TarInfo(f"s{i:03d}.png")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    cfg = load_config(None, TINY + [f"data.train={shard}", f"train.run_dir={tmp_path / 'run'}",
                                    "train.total_steps=50", "data.max_skip_rate=0.2"])
    with pytest.raises(RunAborted, match=r"of \d+ samples could not be used \(corrupt_image=\d+\), more than "
                                         r"data.max_skip_rate=0.2"):
        pretrain(cfg)


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {PWNED}",))


PWNED = ""


def test_malicious_pickles_are_refused_and_never_run(tmp_path, demo):
    global PWNED
    PWNED = str(tmp_path / "pwned")
    run_dir = tmp_path / "run"
    cfg = load_config(None, TINY + [f"data.train={demo.train}", f"train.run_dir={run_dir}", "train.total_steps=2",
                                    "train.save_every=2"])
    pretrain(cfg)
    [(_, ckpt)] = complete_checkpoints(run_dir)
    marker = (ckpt / COMPLETE).read_text()
    for victim in ("optimizer.bin", "random_states_0.pkl"):
        original = (ckpt / victim).read_bytes()
        (ckpt / victim).write_bytes(pickle.dumps(Payload()))
        write_marker(ckpt, 2, {k: v for k, v in json.loads(marker).items() if k not in ("step", "files", "digest")})
        bigger = load_config(None, TINY + [f"data.train={demo.train}", f"train.run_dir={run_dir}",
                                           "train.total_steps=4"])
        # with a marker that vouches for the payload (anyone can write one): refused when loaded
        with pytest.raises(ValueError, match=f"checkpoint {ckpt}: refusing a file that is not plain tensors"):
            pretrain(bigger)
        assert not Path(PWNED).exists(), f"the payload in {victim} ran"
        (ckpt / victim).write_bytes(original)
        (ckpt / COMPLETE).write_text(marker)
    (tmp_path / "backbone.pth").write_bytes(pickle.dumps(Payload()))
    (tmp_path / "backbone.json").write_text("{}")
    with pytest.raises(ValueError, match="backbones load from .safetensors only"):
        load_backbone(tmp_path / "backbone.pth")
    assert not Path(PWNED).exists()


def _bomb_png(width: int, height: int) -> bytes:
    """A real PNG whose header claims width × height pixels: what a decompression bomb looks like to a reader."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, format="PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytearray(data[16:29])  # width, height, depth, colour type, compression, filter, interlace
    ihdr[0:8] = struct.pack(">II", width, height)
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    return bytes(data)


def test_bad_members_are_skipped_counted_and_never_unpickled(tmp_path):
    import io
    import tarfile

    import torch
    from PIL import Image

    from ssl_vit.config.pretrain import DataConfig
    from ssl_vit.data.samples import SKIP_REASONS
    from ssl_vit.data.shards import train_stream
    from ssl_vit.data.transforms import eval_transform

    global PWNED
    PWNED = str(tmp_path / "pwned")
    good = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 90, 200)).save(good, format="JPEG")
    members = [("ok1.jpg", good.getvalue()), ("ok1.pickle", pickle.dumps(Payload())),  # never decoded
               ("zero.jpg", b""),  # zero-byte image
               ("bomb.png", _bomb_png(30_000, 30_000)),  # 900 M pixels > PIL's default limit of ~89 M
               ("onlypickle.pyd", pickle.dumps(Payload())),  # a sample without an image
               ("ok2.jpg", good.getvalue())]
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    loader = iter(train_stream(DataConfig(train=str(shard), batch_size=2, num_workers=0, shuffle_buffer=0),
                               eval_transform(16, 1.0), rank=0, world_size=1, seed=0))
    batch = next(loader)  # ok1 + ok2: the three bad samples in between are skipped
    counts = dict(zip(SKIP_REASONS, batch["skipped"].sum(0).tolist(), strict=True))
    assert counts == {"read_error": 0, "no_image": 1, "corrupt_image": 1, "too_large": 1, "bad_label": 0}
    assert batch["image"].shape == (2, 3, 16, 16) and torch.isfinite(batch["image"]).all()
    assert not Path(PWNED).exists()


def test_missing_or_empty_shards_fail_before_training(tmp_path, capsys):
    from ssl_vit.cli.main import main

    run = ["--set", f"train.run_dir={tmp_path / 'run'}"]
    missing = tmp_path / "nope" / "train-000000.tar"
    assert main(["pretrain", "--no-knn", *run, "--set", f"data.train={missing}"]) == 2
    assert capsys.readouterr().err.strip() == f"ssl-vit pretrain: error: shard not found: {missing}"
    (tmp_path / "empty").mkdir()
    assert main(["pretrain", "--no-knn", *run, "--set", f"data.train={tmp_path / 'empty'}"]) == 2
    assert capsys.readouterr().err.strip() == (f"ssl-vit pretrain: error: no *.tar shards in directory "
                                               f"{tmp_path / 'empty'}")
    assert not (tmp_path / "run").exists()  # nothing written


def test_pipe_urls_refused_unless_allowed(tmp_path, capsys):
    from ssl_vit.cli.main import main

    url = f"pipe:touch {tmp_path}/ran; cat x.tar"
    assert main(["pretrain", "--no-knn", "--set", f"train.run_dir={tmp_path / 'run'}", "--set",
                 f"data.train={url}"]) == 2
    assert capsys.readouterr().err.strip() == (f"ssl-vit pretrain: error: refusing shard URL {url!r}: pipe: runs a "
                                               "shell command; set data.allow_pipe=true (--allow-pipe for knn, "
                                               "linear-probe and visualize) if you trust it")
    assert not (tmp_path / "ran").exists() and not (tmp_path / "run").exists()
