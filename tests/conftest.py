"""Shared test helpers."""

import contextlib

import pytest


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
