"""What a run prints: the per-epoch progress bar and the start and end summaries."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable
from typing import Any

__all__ = ["EpochProgress", "format_duration", "format_summary"]


class EpochProgress:
    """Progress of one epoch, shown on the main process only.

    On a terminal it is a tqdm bar (loss, LR, samples/s and the whole run's ETA as
    its postfix; tqdm's own elapsed time is the epoch time). When standard error is
    not a terminal (a log file, a pipe, a batch job), redrawn bars would fill the log
    with carriage returns: it prints one plain line per epoch instead, and one every
    ``interval`` seconds within a long epoch.

    Advancing it costs a counter increment; tqdm redraws at most twice a second, and
    the numbers shown (loss, LR, samples/s) are only set when the loop has read them
    anyway, so the bar never forces a device sync. Disabled, it is nothing at all:
    tqdm is not even imported (``tqdm.auto`` pulls in asyncio, a tenth of a second).
    """

    def __init__(
        self,
        *,
        enabled: bool,
        total: int,
        initial: int,
        epoch: int,
        epochs: int,
        interval: float = 60.0,
    ):
        self.bar: Any = None
        if not enabled:
            self.advance = self.show = self.close = _nothing  # type: ignore[method-assign,assignment]
            return
        if not _draws_bars(sys.stderr):
            self._plain = _PlainProgress(total, initial, f"epoch {epoch + 1}/{epochs}", interval)
            self.advance = self._plain.advance  # type: ignore[method-assign]
            self.show = self._plain.show  # type: ignore[method-assign]
            self.close = self._plain.close  # type: ignore[method-assign]
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total,
            initial=initial,
            desc=f"epoch {epoch + 1}/{epochs}",
            mininterval=0.5,
            dynamic_ncols=True,
            leave=True,
        )

    def advance(self) -> None:
        self.bar.update(1)

    def show(self, values: dict[str, str]) -> None:
        self.bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        self.bar.close()


class _PlainProgress:
    """One line per epoch (and per ``interval`` seconds), never a carriage return."""

    def __init__(self, total: int, initial: int, desc: str, interval: float) -> None:
        self.total, self.done, self.desc, self.interval = total, initial, desc, interval
        self.values: dict[str, str] = {}
        self.started = self.last_line = time.perf_counter()

    def advance(self) -> None:
        self.done += 1
        if self.interval and time.perf_counter() - self.last_line >= self.interval:
            self._line()

    def show(self, values: dict[str, str]) -> None:
        self.values = dict(values)

    def close(self) -> None:
        self._line()

    def _line(self) -> None:
        now = time.perf_counter()
        self.last_line = now
        shown = " ".join(f"{k}={v}" for k, v in self.values.items() if k != "step")
        print(
            f"{self.desc} {self.done}/{self.total} batches, {format_duration(now - self.started)}"
            f"{' ' + shown if shown else ''}",
            file=sys.stderr,
            flush=True,
        )


def _draws_bars(stream: Any) -> bool:
    """Whether redrawn bars read well on ``stream``: a terminal, or a notebook."""
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) or "ipykernel" in sys.modules


def format_duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h03m``: short and unambiguous."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _nothing(*args: Any) -> None:
    pass


def format_summary(title: str, lines: Iterable[tuple[str, str]]) -> str:
    """Render ``(label, value)`` pairs as an aligned block under ``title``."""
    lines = list(lines)
    width = max((len(label) for label, _ in lines), default=0)
    body = "\n".join(f"  {label.ljust(width)}  {value}" for label, value in lines)
    return f"{title}\n{body}" if body else title
