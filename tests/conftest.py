"""Shared test helpers."""

import contextlib
import socket
import sys

import pytest


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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
