"""A NaN guard that never makes the loop wait for the device.

Reading "is the loss finite?" before every update would cost a host-device
synchronization per update, which stalls a GPU's stream. The loop reads the loss
anyway on logging steps, before every checkpoint and at epoch ends; that read is
where a bad loss is noticed, and the guard then works out the first bad update.

Where the optimizer can skip an update on the device (torch's ``fused=True`` Adam,
AdamW, SGD, Adagrad: the ``found_inf`` input that ``GradScaler`` uses), the guard
decides on the device before every update and feeds it the flag: every update from
the first bad one to the read leaves parameters and optimizer state bitwise as they
were. It keeps, on the device, the number of updates made while the running loss sum
was non-finite (a NaN or infinity keeps the sum non-finite until the next read, so
those updates are the last ones: the first bad update is ``step - count + 1``).

Elsewhere those updates apply, so deciding early buys nothing: the guard does no
tensor op at all per update. It notes how many batches each update closed (a Python
list append), and when the read finds the loss non-finite it looks through the
window's batch losses (:mod:`accel_hydra.pending_losses`) for the first bad one. The
read stops the run and no checkpoint is written from then on, so what is saved is
never touched by a non-finite loss. A ``GradScaler`` (fp16) owns ``found_inf``
itself, so the guard leaves such optimizers alone.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["NonFiniteLossGuard", "skips_on_device"]


def skips_on_device(optimizer: Any, has_scaler: bool) -> bool:
    """Whether ``optimizer`` (a torch optimizer, not a wrapper) can skip an update on
    the device through ``found_inf``; never when a grad scaler drives it."""
    return not has_scaler and bool(getattr(optimizer, "_step_supports_amp_scaling", False))


class NonFiniteLossGuard:
    """Finds the first update with a non-finite loss between two loss reads, without
    a host read per update (and, without a device skip, without a tensor op).

    Args:
        optimizer: the torch optimizer the loop steps (unwrapped).
        device: where the loss sum lives.
        has_scaler: whether a ``GradScaler`` drives ``optimizer`` (fp16).
        reduce_flag: on several processes, a function summing a tensor over them, so
            every process skips the same updates; ``None`` on one process.
    """

    def __init__(
        self,
        optimizer: Any,
        device: torch.device,
        has_scaler: bool,
        reduce_flag: Any = None,
    ) -> None:
        self.skips_on_device = skips_on_device(optimizer, has_scaler)
        self._optimizer = optimizer if self.skips_on_device else None
        self._reduce_flag = reduce_flag if self.skips_on_device else None
        self._found_inf = torch.zeros((), device=device, dtype=torch.float32)
        self._bad_updates = torch.zeros((), device=device, dtype=torch.float32)
        #: Without a device skip: the window's batch count at each of its updates.
        self.update_ends: list[int] = []
        if self._optimizer is not None:
            self._optimizer.found_inf = self._found_inf

    def before_update(self, loss_sum: torch.Tensor) -> None:
        """Count this update if ``loss_sum`` (the losses since the last read) is not
        finite, and tell a fused optimizer to skip it. No host read. Only for an
        optimizer that :attr:`skips_on_device`; for the others the loop appends each
        update's batch count to :attr:`update_ends`."""
        bad = torch.isfinite(loss_sum).logical_not_()
        if self._reduce_flag is not None:
            bad = self._reduce_flag(bad.float()) > 0
        self._found_inf.copy_(bad)
        self._bad_updates.add_(self._found_inf)

    def window_read(self) -> None:
        """The loop read the loss: a new window starts."""
        self.update_ends.clear()

    def bad_updates_in(self, losses: torch.Tensor) -> int:
        """How many of the window's updates saw a non-finite loss, given its batch
        losses in order: the update holding the first bad batch and every one after.

        A batch is bad once the running sum of the window is no longer finite: its own
        loss is NaN or infinite, or the sum overflowed there. Reads ``losses`` to the
        host: call it only once a read found the loss non-finite.
        """
        if not len(losses):
            return 0
        running = losses.detach().double().cpu().cumsum(0).float()
        nonfinite = (~torch.isfinite(running)).nonzero()
        first_bad = int(nonfinite[0]) if len(nonfinite) else len(running) - 1
        return sum(1 for end in self.update_ends if end > first_bad)

    @property
    def bad_updates(self) -> torch.Tensor:
        """How many of the last updates saw a non-finite loss, on the device (reading
        it is a sync: do so only once a loss read found the loss non-finite)."""
        return self._bad_updates

    def close(self) -> None:
        """Take the flag back from the optimizer, which may be stepped by hand later."""
        if self._optimizer is not None and getattr(self._optimizer, "found_inf", None) is (
            self._found_inf
        ):
            del self._optimizer.found_inf
        self._optimizer = None
