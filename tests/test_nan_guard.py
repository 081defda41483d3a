"""NonFiniteLossGuard on its own, without a training loop."""

import math

import torch

from accel_hydra.nan_guard import NonFiniteLossGuard, skips_on_device


def adamw(fused):
    return torch.optim.AdamW([torch.nn.Parameter(torch.ones(3))], lr=0.1, fused=fused)


def test_only_an_optimizer_with_found_inf_and_no_scaler_skips_on_the_device():
    assert skips_on_device(adamw(fused=True), has_scaler=False)
    assert not skips_on_device(adamw(fused=True), has_scaler=True)  # the scaler owns it
    assert not skips_on_device(adamw(fused=None), has_scaler=False)


def test_counts_the_updates_since_the_loss_went_bad_and_skips_them():
    optimizer = adamw(fused=True)
    (param,) = optimizer.param_groups[0]["params"]
    guard = NonFiniteLossGuard(optimizer, torch.device("cpu"), has_scaler=False)
    total = torch.zeros(())
    for loss in (1.0, 2.0, math.nan, 3.0, 4.0):
        total += loss
        param.grad = torch.full((3,), loss)
        guard.before_update(total)
        if math.isnan(loss):
            before = param.detach().clone()
        optimizer.step()
    assert guard.bad_updates.item() == 3  # the NaN update and the two after it
    assert torch.equal(param, before)  # all three skipped
    assert optimizer.state[param]["step"].item() == 2
    guard.close()
    assert not hasattr(optimizer, "found_inf")


def test_without_found_inf_the_optimizer_is_left_alone_but_updates_are_counted():
    optimizer = adamw(fused=None)
    guard = NonFiniteLossGuard(optimizer, torch.device("cpu"), has_scaler=False)
    assert not hasattr(optimizer, "found_inf")
    guard.before_update(torch.tensor(math.inf))
    guard.before_update(torch.tensor(math.nan))
    assert guard.bad_updates.item() == 2
