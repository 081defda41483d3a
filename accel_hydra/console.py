"""What a run prints: the per-epoch progress bar and the start and end summaries."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["EpochProgress", "format_summary"]


class EpochProgress:
    """A tqdm bar for one epoch, drawn on the main process only.

    Advancing it costs a counter increment; tqdm redraws at most twice a second, and
    the numbers shown (loss, LR, samples/s) are only set when the loop has read them
    anyway, so the bar never forces a device sync. Disabled, it is nothing at all:
    tqdm is not even imported (``tqdm.auto`` pulls in asyncio, a tenth of a second).
    """

    def __init__(self, *, enabled: bool, total: int, initial: int, epoch: int, epochs: int):
        self.bar: Any = None
        if not enabled:
            self.advance = self.show = self.close = _nothing  # type: ignore[method-assign,assignment]
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


def _nothing(*args: Any) -> None:
    pass


def format_summary(title: str, lines: Iterable[tuple[str, str]]) -> str:
    """Render ``(label, value)`` pairs as an aligned block under ``title``."""
    lines = list(lines)
    width = max((len(label) for label, _ in lines), default=0)
    body = "\n".join(f"  {label.ljust(width)}  {value}" for label, value in lines)
    return f"{title}\n{body}" if body else title
