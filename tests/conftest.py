"""Shared test helpers."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_group(argv: list[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """`subprocess.run(capture_output=True, text=True)` for launchers: the command gets its own process group, and
    whatever is left of it at the end (on a timeout: everything) is killed, the ranks too. Killing only the
    launcher once left two ranks of a failed test running for two hours."""
    with subprocess.Popen(argv, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def wait_for(predicate, proc, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"process ended early:\n{proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("timed out waiting")


@pytest.fixture
def accelerate_launch():
    """`accelerate_launch()`: the command that launches 2 CPU processes (gloo), on a port free right now. The
    default, 29500, may still be held by an earlier launch's rendezvous, or by anything else on the machine."""
    return lambda: [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "--main_process_port", str(_free_port())]


class Crash(Exception):
    """Raised inside a training step to simulate a process dying there."""


@pytest.fixture
def crash_in_step(monkeypatch):
    """`with crash_in_step(cls, n): pretrain(cfg)` dies during 0-based step n, after its forward/backward."""

    @contextlib.contextmanager
    def crashing(cls, step_to_die):
        original = cls.after_step

        def dying(self, step):
            if step == step_to_die:
                raise Crash
            original(self, step)

        monkeypatch.setattr(cls, "after_step", dying)
        with pytest.raises(Crash):
            yield
        monkeypatch.setattr(cls, "after_step", original)

    return crashing
