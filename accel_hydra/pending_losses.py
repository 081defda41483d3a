"""The batch losses since the last loss read, kept on the device at no cost per batch.

The loop reads the loss only on logging steps, before a checkpoint and at epoch end
(a host read is a device sync). Between reads it used to keep a running sum, one
tensor op per batch; on a small model that op and the NaN guard's four per update
were a visible share of the step. Now a batch costs a ``detach`` and a list append:
the losses are stacked into a device buffer every :data:`FOLD_EVERY` batches and
summed only when somebody asks for the sum.

Keeping every loss of the window (4 bytes per batch since the last read, in one
buffer that grows by doubling and is reused) also lets the NaN guard find the first
non-finite loss after the fact, instead of tracking it on the device at every update
(:mod:`accel_hydra.nan_guard`).
"""

from __future__ import annotations

import torch

__all__ = ["FOLD_EVERY", "PendingLosses"]

#: Batches between two folds of the list into the device buffer: bounds the number of
#: small tensors alive at once (each a device allocation) while keeping folds rare.
FOLD_EVERY = 256


class PendingLosses:
    """The detached losses of the batches since the last :meth:`clear`.

    ``unfolded`` is the list the loop appends to (``loss.detach()``, nothing else per
    batch); when it reaches :data:`FOLD_EVERY` entries, or whenever the losses are
    asked for, it is folded into a float32 buffer on ``device`` (one stack, one copy).
    """

    def __init__(self, device: torch.device | str) -> None:
        self.unfolded: list[torch.Tensor] = []
        self._buffer = torch.zeros(FOLD_EVERY, device=device, dtype=torch.float32)
        self._folded = 0
        self._last_window = 0

    def fold(self) -> None:
        """Move the unfolded losses into the buffer; checks they are scalars."""
        losses = self.unfolded
        if not losses:
            return
        stacked = _stack(losses, self._buffer.device)
        start, end = self._folded, self._folded + len(losses)
        if end > self._buffer.numel():
            grown = torch.zeros(
                max(end, 2 * self._buffer.numel()), device=self._buffer.device, dtype=torch.float32
            )
            grown[:start].copy_(self._buffer[:start])
            self._buffer = grown
        self._buffer[start:end].copy_(stacked)
        self._folded = end
        losses.clear()

    def values(self) -> torch.Tensor:
        """Every loss since the last :meth:`clear`, in order, as a float32 tensor on the
        device (a view of the buffer, valid until the next fold). No host read."""
        self.fold()
        return self._buffer[: self._folded]

    def total(self) -> torch.Tensor:
        """The sum of the losses since the last :meth:`clear`, a float32 device scalar."""
        return self.values().sum()

    def clear(self) -> None:
        """Start a new window (the buffer is kept for reuse)."""
        self.fold()
        self._last_window, self._folded = self._folded, 0

    def last_window(self) -> torch.Tensor:
        """The losses of the window the last :meth:`clear` ended; valid until the next
        fold overwrites them (read them right after the loss read that cleared)."""
        return self._buffer[: self._last_window]


def _stack(losses: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The losses as one 1-D tensor; a clear error when one is not a scalar."""
    stacked: torch.Tensor | None
    try:
        stacked = torch.stack(losses)
    except RuntimeError:  # several shapes, or several devices
        if all(loss.dim() == 0 for loss in losses):
            return torch.stack([loss.to(device) for loss in losses])
        stacked = None
    if stacked is None or stacked.dim() != 1:
        shape = next(tuple(loss.shape) for loss in losses if loss.dim())
        raise ValueError(
            f"training_step must return a scalar loss tensor, got one of shape {shape}: "
            "reduce it first (for example loss.mean())"
        )
    return stacked
