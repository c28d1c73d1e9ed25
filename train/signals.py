"""Ctrl-C and SIGTERM during pretraining: stop after the step in flight, with a checkpoint.

    stop = StopOnSignal()
    for step in ...:
        ...                                # one train step
        if stop.signum is not None:        # save, then
            raise Interrupted(stop.signum, step, checkpoint_dir)
    stop.restore()
"""
from __future__ import annotations

import signal
import sys
import threading


class Interrupted(RuntimeError):
    """SIGINT / SIGTERM during the steps: the step in flight finished and was checkpointed."""

    def __init__(self, signum: int, step: int, directory):
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; saved a "
                         f"checkpoint in {directory}; run the same command again to resume from "
                         f"step {step}")


class StopOnSignal:
    """Turns SIGINT / SIGTERM into a flag the loop reads between steps (so the step in flight
    and its checkpoint complete). A second signal gets the previous handler: a second Ctrl-C
    stops at once. Single-host only: the save is a collective, and hosts that see a signal at
    different steps would wait on each other, so multi-host jobs keep the default handlers."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, enabled: bool = True):
        self.signum = None
        self.previous = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum
        self.restore()
        print(f"\n{signal.Signals(signum).name}: finishing the current step and saving a "
              "checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)

    def restore(self):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}
