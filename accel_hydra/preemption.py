"""PreemptionGuard: SIGTERM or a first Ctrl-C becomes a request to checkpoint and stop.

A cluster preempting a job sends SIGTERM and waits a grace period before SIGKILL. The
guard only records the signal; the loop acts on it at the next optimizer-update
boundary (so no accumulated gradient is lost): it writes a checkpoint, flushes, and
exits with ``128 + signal``. A second Ctrl-C aborts at once, for a person at a
terminal who does not want to wait.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

__all__ = ["PreemptionGuard", "TrainingInterrupted"]


class TrainingInterrupted(SystemExit):
    """Raised by ``train()`` after a preemption checkpoint; exits with ``128 + signal``.

    Attributes:
        signal_number: the signal that asked the run to stop.
    """

    def __init__(self, signal_number: int, message: str) -> None:
        super().__init__(128 + signal_number)
        self.signal_number = signal_number
        self.message = message

    def __str__(self) -> str:
        return self.message


class PreemptionGuard:
    """Record SIGTERM and SIGINT while training; restore the previous handlers after.

    Handlers can only be installed from the main thread; elsewhere the guard records
    nothing and training keeps Python's default behaviour.

    Attributes:
        signal_number: the first signal received, or ``None``.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._record)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signal_number is not None:
            raise KeyboardInterrupt("second interrupt: aborting without a checkpoint")
        if self.signal_number is None:
            self.signal_number = signum

    @property
    def requested(self) -> bool:
        return self.signal_number is not None
