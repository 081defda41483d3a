"""Building an LR scheduler whose length is known only after ``accelerator.prepare``.

A schedule's length is a number of optimizer updates, which depends on the dataset,
the number of processes and gradient accumulation. The config therefore gives the
scheduler as a callable (a Hydra ``_partial_``); :func:`build_lr_scheduler` fills the
length arguments its signature asks for from the true number of updates.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["LENGTH_ARGUMENTS", "build_lr_scheduler", "is_lr_scheduler"]

#: Constructor arguments that mean "how many times ``step()`` will be called in all".
LENGTH_ARGUMENTS = ("num_training_steps", "total_steps", "T_max", "total_iters")


def is_lr_scheduler(obj: Any) -> bool:
    """Whether ``obj`` is an already built scheduler (not a factory)."""
    return isinstance(
        obj, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    )


def build_lr_scheduler(
    factory: Callable[..., Any], optimizer: torch.optim.Optimizer, total_steps: int
) -> Any:
    """Call ``factory(optimizer, ...)``, filling its unset length argument with ``total_steps``.

    Only a length argument that the factory leaves open (no default, or ``None`` as
    OneCycleLR's ``total_steps``) and that is not bound already (by ``functools.partial``
    or Hydra's ``_partial_``) is filled: a length the user wrote down is never overridden.

    Args:
        factory: a scheduler class or partial, called with the optimizer first.
        optimizer: the (unwrapped) optimizer the schedule drives.
        total_steps: how many times the scheduler will be stepped in the whole run.

    Returns:
        The scheduler.

    Raises:
        TypeError: the factory still lacks a required argument; the message names it.
    """
    bound = factory.keywords if isinstance(factory, functools.partial) else {}
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}
    fill = {
        name: total_steps
        for name in LENGTH_ARGUMENTS
        if name in parameters
        and name not in bound
        and parameters[name].default in (inspect.Parameter.empty, None)
    }
    try:
        return factory(optimizer, **fill)
    except TypeError as err:
        raise TypeError(
            f"could not build the LR scheduler from {factory!r}: {err}. Give the missing "
            "argument in the lr_scheduler config"
        ) from err
