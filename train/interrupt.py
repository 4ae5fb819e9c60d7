"""SIGTERM / SIGINT: ask the loop to save a checkpoint and stop at the end of the current step.

The handler only raises Accelerate's trigger; the loop polls ``accelerator.check_trigger()`` once per step,
which all processes agree on, so every process stops at the same step. A second signal stops at once.
"""

from __future__ import annotations

import signal

from accelerate import Accelerator


class StopOnSignal:
    """Context manager that turns the first SIGTERM / SIGINT into a graceful stop request."""

    signals = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # second signal: give up on saving
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        self.accelerator.set_trigger()

    def __enter__(self) -> StopOnSignal:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
