"""Stop signals in DataLoader worker processes: the training process alone acts on them (see signals.py)."""

from __future__ import annotations

import os
import signal
import threading


def leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """A loader worker's `worker_init_fn`: stop signals are the main process's to act on. Ctrl-C signals the
    terminal's whole process group and SLURM every process of the job step, so the workers get them too; one
    that died of it (or raised KeyboardInterrupt) would crash the training process mid-step or mid-save, before
    it could stop cleanly (signals.py). SIGINT is ignored. SIGTERM still ends a worker when its parent sends it
    (the loader's shutdown, or Python's exit terminating daemon processes after a crash: ignoring that one
    would leave the exit waiting forever), and only then; where the sender cannot be told (no sigwaitinfo,
    e.g. macOS), SIGTERM is ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return
    # Blocked here, before the worker starts any thread (they inherit the mask): a SIGTERM then waits for the
    # thread below, which alone accepts it and can read who sent it.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_end_on_the_parents_sigterm, args=(os.getppid(),), daemon=True,
                     name="sigterm-from-parent").start()


def _end_on_the_parents_sigterm(parent: int) -> None:
    while True:
        if signal.sigwaitinfo({signal.SIGTERM}).si_pid == parent:
            os._exit(0)  # what torch's own worker handler does on its parent's SIGTERM
