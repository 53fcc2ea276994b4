"""Graceful stops: SIGTERM / SIGINT ask every rank to stop at the same step boundary, save and exit 0."""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Context manager that turns the first SIGTERM/SIGINT into a flag the training loop polls.

    A second signal of the same kind falls through to the previous handler (Ctrl-C twice still interrupts at
    once). The loop all-reduces the flag every step, so a signal delivered to any one rank stops all of them
    after the same step.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # asked twice: stop being graceful
            previous = self._previous.get(signum)
            signal.signal(signum, previous if callable(previous) else signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in _SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)  # type: ignore[arg-type]
        self._previous.clear()
