"""The optional capabilities of a trainer, one mixin per module."""

from accel_hydra.mixins.checkpoint import CheckpointMixin
from accel_hydra.mixins.early_stopping import EarlyStoppingMixin
from accel_hydra.mixins.ema import EMAMixin
from accel_hydra.mixins.grad_clip import GradClipMixin
from accel_hydra.mixins.logging import LoggingMixin
from accel_hydra.mixins.lr_scheduling import LRSchedulingMixin

__all__ = [
    "CheckpointMixin",
    "EMAMixin",
    "EarlyStoppingMixin",
    "GradClipMixin",
    "LRSchedulingMixin",
    "LoggingMixin",
]
