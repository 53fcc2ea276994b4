"""Graceful stops: SIGTERM / SIGINT ask every rank to stop at the same step boundary, save and exit 0."""

from __future__ import annotations

import signal
import threading
from types import FrameType

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Turns the first SIGTERM/SIGINT into a flag the loop all-reduces every step; a second one falls through to
    the previous handler (Ctrl-C twice still interrupts at once)."""

    def __init__(self) -> None:
        self.name = ""  # of the signal that asked to stop
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.name:  # asked twice: stop being graceful
            previous = self._previous.get(signum)
            signal.signal(signum, previous if callable(previous) else signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.name = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in _SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous.clear()
