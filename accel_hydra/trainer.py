"""Trainer: LoopBase with every mixin, the class most users subclass."""

from __future__ import annotations

from dataclasses import dataclass

from accel_hydra.compat import LoggingConfig
from accel_hydra.loop import LoopBase
from accel_hydra.mixins import (
    CheckpointMixin,
    EarlyStoppingMixin,
    GradClipMixin,
    LoggingMixin,
    LRSchedulingMixin,
)
from accel_hydra.monitor import MetricMonitor

# MetricMonitor and LoggingConfig: the import paths upstream AccelHydra configs use;
# LoggingConfig refuses to build, naming report_to/log_dir.
__all__ = ["LoggingConfig", "MetricMonitor", "Trainer"]


@dataclass(kw_only=True, eq=False)
class Trainer(
    CheckpointMixin,
    EarlyStoppingMixin,
    LRSchedulingMixin,
    LoggingMixin,
    GradClipMixin,
    LoopBase,
):
    """The full trainer: checkpoints, early stopping, LR scheduling, logging, clipping.

    Subclass it and implement :meth:`training_step` and :meth:`validation_step`
    (optionally :meth:`get_val_metrics` and the ``on_*`` hooks). Every field of
    :class:`~accel_hydra.LoopBase` and of each mixin is a keyword argument, so Hydra
    builds it straight from YAML.

    Example:
        >>> @dataclass(kw_only=True)
        ... class MyTrainer(Trainer):
        ...     def training_step(self, batch, batch_idx):
        ...         x, y = batch
        ...         return self.loss_fn(self.model(x), y)
        ...     def validation_step(self, batch, batch_idx):
        ...         ...
    """
