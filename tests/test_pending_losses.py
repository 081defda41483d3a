"""PendingLosses: the losses between two loss reads, kept without a tensor op per batch."""

import math

import pytest
import torch

from accel_hydra.nan_guard import NonFiniteLossGuard
from accel_hydra.pending_losses import FOLD_EVERY, PendingLosses


def add(pending: PendingLosses, values) -> None:
    """What the loop does per batch (fold included)."""
    for value in values:
        pending.unfolded.append(torch.tensor(value).detach())
        if len(pending.unfolded) == FOLD_EVERY:
            pending.fold()


def test_keeps_every_loss_in_order_across_folds_and_growth():
    pending = PendingLosses("cpu")
    values = [float(i % 7) - 3.0 for i in range(3 * FOLD_EVERY + 5)]  # grows the buffer
    add(pending, values)
    assert pending.values().tolist() == values
    assert pending.total().item() == sum(values)


def test_a_read_starts_a_new_window_and_keeps_the_old_one_readable():
    pending = PendingLosses("cpu")
    add(pending, [1.0, 2.0, 3.0])
    assert pending.total().item() == 6.0
    pending.clear()
    assert pending.last_window().tolist() == [1.0, 2.0, 3.0]
    add(pending, [10.0])
    assert pending.total().item() == 10.0


def test_low_precision_losses_are_summed_in_float32():
    pending = PendingLosses("cpu")
    for _ in range(300):
        pending.unfolded.append(torch.tensor(1.0, dtype=torch.bfloat16))
    # bfloat16 counts only up to 256 exactly; the float32 buffer does not round.
    assert pending.total().item() == 300.0


def test_a_loss_that_is_not_a_scalar_is_named():
    pending = PendingLosses("cpu")
    pending.unfolded.append(torch.ones(3))
    with pytest.raises(ValueError, match=r"training_step must return a scalar.*\(3,\)"):
        pending.fold()


@pytest.mark.parametrize(
    ("losses", "update_ends", "bad"),
    [
        ([1.0, 2.0, math.nan, 3.0], [1, 2, 3, 4], 2),  # the NaN update and the one after
        ([1.0, 2.0, 3.0, math.inf, 5.0, 6.0], [2, 4, 6], 2),  # accumulation 2: batch 4
        ([1.0, math.nan, 1.0, 1.0], [2, 4], 2),  # the first update's second batch
        ([3e38, 3e38, 1.0], [1, 2, 3], 2),  # the float32 sum overflows at batch 2
    ],
)
def test_the_guard_finds_the_first_bad_update_in_the_window(losses, update_ends, bad):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)
    guard = NonFiniteLossGuard(optimizer, torch.device("cpu"), has_scaler=False)
    assert not guard.skips_on_device
    guard.update_ends.extend(update_ends)
    assert guard.bad_updates_in(torch.tensor(losses)) == bad
    guard.window_read()
    assert guard.update_ends == []
