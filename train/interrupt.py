"""SIGTERM / SIGINT: the first asks the loop to save a checkpoint and stop; a second one stops at once.

The handler only records the signal (``received``); after every step the loop sums that flag over all processes
on the CPU (no device sync), so every process stops at the same step. A second signal raises
:class:`SecondSignal` wherever the process is. A save it interrupts removes its temporary folder (checkpoints
are renamed into place only when complete), so what is left is the complete new checkpoint or none, and the
previous one is untouched; the trainer then says which checkpoint is the newest.
"""

from __future__ import annotations

import signal

from accelerate import Accelerator


class SecondSignal(KeyboardInterrupt):
    """A second SIGTERM / SIGINT arrived after the first one had asked the run to stop."""

    def __init__(self, signal_name: str, signal_number: int):
        super().__init__(f"second {signal_name}")
        self.signal_name = signal_name
        self.signal_number = signal_number


class StopOnSignal:
    """Context manager that turns the first SIGTERM / SIGINT into a graceful stop request."""

    signals = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self.received: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:  # second signal: give up on saving
            raise SecondSignal(name, signum)
        self.received = name

    def __enter__(self) -> StopOnSignal:
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
