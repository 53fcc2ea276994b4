"""One run per run dir (an OS lock), a full disk during a save, a damaged newest checkpoint: each provoked for real
through the CLI, each a one-line message, each followed by the same command resuming."""

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_group, wait_for
from tiny_runs import TINY_MAE

from ssl_vit.cli.main import main
from ssl_vit.data.demo import ensure_demo_data
from ssl_vit.training.checkpoint import complete_checkpoints, latest_checkpoint

ROOT = Path(__file__).resolve().parent.parent
INJECT = str(ROOT / "tests" / "inject_fault.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TINY = TINY_MAE + [
    "data.batch_size=4", "data.num_workers=0", "data.shuffle_buffer=8", "optim.lr=1e-3",
    "train.warmup_steps=1", "train.log_every=1", "train.image_every=0", "train.export=false"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return ensure_demo_data(tmp_path_factory.mktemp("demo"), n_train=40, n_knn_train=8, n_knn_val=8)


def sets(*items: str) -> list[str]:
    return [a for kv in items for a in ("--set", kv)]


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def test_a_second_run_in_the_same_dir_is_refused_naming_the_holder_and_a_killed_holder_does_not_block(
        tmp_path, demo, capsys):
    run_dir = tmp_path / "run"
    args = sets(*TINY, f"data.train={demo.train}", f"train.run_dir={run_dir}", "train.save_every=1000")
    holder = subprocess.Popen([sys.executable, "-m", "ssl_vit", "pretrain", *args, "--set", "train.total_steps=100000"],
                              cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (run_dir / "log.jsonl").is_file(), holder)  # training: the lock is held
        assert (run_dir / ".lock").read_text() == f"{holder.pid}\n"
        assert main(["pretrain", "--no-knn", *args, "--set", "train.total_steps=2"]) == 2
        assert capsys.readouterr().err == (f"ssl-vit pretrain: error: train.run_dir {run_dir} is in use by another "
                                           f"run (pid {holder.pid}); wait for it to end or set another train.run_dir\n")
        steps = len((run_dir / "log.jsonl").read_text().splitlines())
    finally:
        holder.send_signal(signal.SIGKILL)  # leaves its lock file behind, as a crash or the OOM killer would
        holder.wait(timeout=30)
    assert steps >= 1 and not list(run_dir.glob("events.out.tfevents.*"))[1:]  # one run's log only
    assert main(["pretrain", "--no-knn", *args, "--set", "train.total_steps=2"]) == 0


def test_a_full_disk_during_a_save_is_one_line_and_the_same_command_resumes(tmp_path, demo):
    run_dir = tmp_path / "run"
    argv = [sys.executable, INJECT, "disk_full", str(tmp_path), "pretrain",
            *sets(*TINY, f"data.train={demo.train}", f"train.run_dir={run_dir}", "train.total_steps=6",
                  "train.save_every=2", "train.keep_last=3")]
    out = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert last_line(out.stderr) == (f"ssl-vit pretrain: error: No space left on device: "
                                     f"{run_dir / 'checkpoints' / 'step_00000004'}")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002"]  # no temp dir left
    assert latest_checkpoint(run_dir)[0] == 2  # whole: every checksum matches

    argv[2] = "none"  # space is free again: the same command
    out = subprocess.run(argv, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resumed from" in out.stdout and "(step 2)" in out.stdout
    assert [s for s, _ in complete_checkpoints(run_dir)] == [2, 4, 6]


def test_a_full_disk_on_one_rank_stops_both_without_a_hang(tmp_path, demo, accelerate_launch):
    run_dir = tmp_path / "run"
    argv = [*accelerate_launch(), INJECT, "disk_full", str(tmp_path), "pretrain",
            *sets(*TINY, f"data.train={demo.train}", f"train.run_dir={run_dir}", "train.total_steps=6",
                  "train.save_every=2", "train.keep_last=3")]
    out = run_group(argv, cwd=ROOT, env=ENV, timeout=300)
    assert out.returncode != 0
    # rank 1's line (rank 0's progress bar may share its terminal line), then rank 0's
    assert f"ssl-vit pretrain: error: No space left on device: {run_dir / 'checkpoints' / 'step_00000004'}\n" in (
        out.stderr)
    assert "ssl-vit pretrain: error: another process failed to save checkpoint" in out.stderr
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002"]


def _unshare_works() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="no user namespaces here to mount a small tmpfs in")
def test_a_real_full_tmpfs(tmp_path, demo):
    """The same through a real full filesystem: a tmpfs with room for one checkpoint beside a ballast file."""
    mount, run_dir = tmp_path / "small", tmp_path / "small" / "run"
    mount.mkdir()
    pretrain = [sys.executable, "-m", "ssl_vit", "pretrain", "--no-knn",
                *sets(*TINY, f"data.train={demo.train}", f"train.run_dir={run_dir}", "train.total_steps=4",
                      "train.save_every=2", "train.keep_last=2")]
    script = f"""set -e
mount -t tmpfs -o size=4m tmpfs {mount}
head -c 2600000 /dev/zero > {mount}/ballast
set +e; {shlex.join(pretrain)} 2> {tmp_path}/first.err; echo $? > {tmp_path}/first.rc; set -e
ls -a {run_dir}/checkpoints > {tmp_path}/first.left
rm {mount}/ballast
{shlex.join(pretrain)} > {tmp_path}/second.out 2> {tmp_path}/second.err; echo $? > {tmp_path}/second.rc
ls -a {run_dir}/checkpoints > {tmp_path}/second.left
"""
    subprocess.run(["unshare", "-rm", "bash", "-c", script], cwd=ROOT, env=ENV, timeout=300, check=True)
    read = {p.name: p.read_text() for p in tmp_path.iterdir() if p.is_file()}
    assert read["first.rc"] == "1\n" and "Traceback" not in read["first.err"], read["first.err"][-2000:]
    assert last_line(read["first.err"]).startswith("ssl-vit pretrain: error: No space left on device: ")
    assert read["first.left"].split() == [".", "..", "step_00000002"]  # no temp dir left
    assert read["second.rc"] == "0\n", read["second.err"][-2000:]
    assert "(step 2)" in read["second.out"] and read["second.left"].split() == [".", "..", "step_00000002",
                                                                                  "step_00000004"]
