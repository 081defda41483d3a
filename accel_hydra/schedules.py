"""Building an LR scheduler whose length is known only after ``accelerator.prepare``.

A schedule's length is a number of optimizer updates, which depends on the dataset,
the number of processes and gradient accumulation. The config therefore gives the
scheduler as a callable (a Hydra ``_partial_``); :func:`build_lr_scheduler` fills the
length arguments its signature asks for from the true number of updates.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

__all__ = ["LENGTH_ARGUMENTS", "build_lr_scheduler", "is_lr_scheduler", "warmup_length"]

#: Constructor arguments that mean "how many times ``step()`` will be called in all".
LENGTH_ARGUMENTS = ("num_training_steps", "total_steps", "T_max", "total_iters")


def is_lr_scheduler(obj: Any) -> bool:
    """Whether ``obj`` is an already built scheduler (not a factory)."""
    return isinstance(
        obj, (torch.optim.lr_scheduler.LRScheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
    )


def warmup_length(total_steps: int, warmup_steps: int | None, warmup_ratio: float | None) -> int:
    """Warmup updates from an absolute count or a fraction of the whole schedule."""
    if warmup_steps is not None:
        return int(warmup_steps)
    if warmup_ratio is not None:
        return int(round(warmup_ratio * total_steps))
    return 0


def build_lr_scheduler(
    factory: Callable[..., Any],
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
) -> Any:
    """Call ``factory(optimizer, ...)``, filling its open length arguments.

    Only a length argument that the factory leaves open (no default, or ``None`` as
    OneCycleLR's ``total_steps``) and that is not bound already (by ``functools.partial``
    or Hydra's ``_partial_``) is filled: a length the user wrote down is never overridden.

    Warmup: a factory with a ``num_warmup_steps`` argument (the transformers
    ``get_*_schedule_with_warmup`` family) gets it filled. Any other schedule is preceded
    by a linear warmup of ``warmup_steps`` updates and sized to the updates left.

    Args:
        factory: a scheduler class or partial, called with the optimizer first.
        optimizer: the (unwrapped) optimizer the schedule drives.
        total_steps: how many times the scheduler will be stepped in the whole run.
        warmup_steps: updates of warmup at the start (0: none).

    Returns:
        The scheduler.

    Raises:
        TypeError: the factory still lacks a required argument; the message names it.
    """
    bound = factory.keywords if isinstance(factory, functools.partial) else {}
    parameters: Mapping[str, inspect.Parameter]
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        parameters = {}

    def open_argument(name: str) -> bool:
        return (
            name in parameters
            and name not in bound
            and parameters[name].default in (inspect.Parameter.empty, None)
        )

    takes_warmup = "num_warmup_steps" in parameters and "num_warmup_steps" not in bound
    wrap_in_warmup = warmup_steps > 0 and not takes_warmup
    length = total_steps - warmup_steps if wrap_in_warmup else total_steps
    if wrap_in_warmup and length < 1:
        raise ValueError(
            f"warmup of {warmup_steps} updates leaves nothing of the {total_steps}-update "
            "schedule; lower warmup_steps or warmup_ratio"
        )
    fill = {name: length for name in LENGTH_ARGUMENTS if open_argument(name)}
    if takes_warmup:
        fill["num_warmup_steps"] = warmup_steps
    try:
        scheduler = factory(optimizer, **fill)
    except TypeError as err:
        raise TypeError(
            f"could not build the LR scheduler from {factory!r}: {err}. Check the "
            "arguments in the lr_scheduler config"
        ) from err
    if not wrap_in_warmup:
        return scheduler
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ValueError("ReduceLROnPlateau cannot follow a warmup; drop warmup_steps/ratio")
    warmup = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0 / warmup_steps, end_factor=1.0, total_iters=warmup_steps
    )
    return torch.optim.lr_scheduler.SequentialLR(
        optimizer, [warmup, scheduler], milestones=[warmup_steps]
    )
