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

import torch

__all__ = ["InterruptAgreement", "PreemptionGuard", "TrainingInterrupted"]


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


class InterruptAgreement:
    """Agree on every process, within one update, whether any of them was signalled.

    A cluster may signal only some processes of a job, and every process must stop at
    the same update or the others wait forever in the next collective. No collective
    that runs anyway can carry the flag (the gradient all-reduce sums gradients), so
    each update starts a one-number all-reduce (max) of the flag without waiting for
    it, and reads the one started an update earlier, long finished by then. The cost
    per update is that small message, never a wait on the device: the flag lives on
    the CPU, in a gloo group of its own when the main backend is not gloo (NCCL).

    Call :meth:`poll` once per update and :meth:`now` at epoch ends, on every process
    in the same order.
    """

    def __init__(self) -> None:
        self._pending: tuple[Any, torch.Tensor] | None = None
        self._group: Any = None
        self._group_ready = False

    def poll(self, requested: bool) -> bool:
        """Whether any process had been signalled one update ago; starts this update's
        exchange of ``requested``."""
        if self._finish():
            return True
        self._pending = self._start(requested)
        return False

    def now(self, requested: bool) -> bool:
        """Whether any process has been signalled by now; waits for the answer."""
        if self._finish():
            return True
        work, flag = self._start(requested)
        work.wait()
        return bool(flag.item())

    def _finish(self) -> bool:
        if self._pending is None:
            return False
        (work, flag), self._pending = self._pending, None
        work.wait()
        return bool(flag.item())

    def _start(self, requested: bool) -> tuple[Any, torch.Tensor]:
        import torch.distributed as dist

        if not self._group_ready:
            # Created on the first update, reached by every process at the same point.
            if dist.get_backend() != "gloo":
                self._group = dist.new_group(backend="gloo")
            self._group_ready = True
        flag = torch.tensor([float(requested)])
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        return work, flag
