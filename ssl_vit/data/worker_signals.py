"""Stop signals in DataLoader worker processes: the training process alone acts on them (see signals.py)."""

from __future__ import annotations

import os
import signal
import threading


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """A loader worker's `worker_init_fn`: SIGINT ignored, SIGTERM obeyed only from the parent (docs/data.md), so
    a Ctrl-C or SLURM signal to the whole group never kills a worker before the trainer stops cleanly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    # blocked before any thread starts (they inherit the mask): only the thread below accepts it, and sees who sent it
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_end_on_the_parents_sigterm, args=(os.getppid(),), daemon=True,
                     name="sigterm-from-parent").start()


def _end_on_the_parents_sigterm(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)  # what torch's own worker handler does on its parent's SIGTERM
