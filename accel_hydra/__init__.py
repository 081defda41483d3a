"""accel_hydra: a small PyTorch trainer built on Accelerate, Hydra and fsspec."""

from accel_hydra.launcher import TrainLauncher
from accel_hydra.loop import LoopBase
from accel_hydra.mixins import (
    CheckpointMixin,
    EarlyStoppingMixin,
    EMAMixin,
    GradClipMixin,
    LoggingMixin,
    LRSchedulingMixin,
)
from accel_hydra.monitor import MetricMonitor
from accel_hydra.trainer import Trainer

__version__ = "0.1.0"

__all__ = [
    "CheckpointMixin",
    "EMAMixin",
    "EarlyStoppingMixin",
    "GradClipMixin",
    "LRSchedulingMixin",
    "LoggingMixin",
    "LoopBase",
    "MetricMonitor",
    "TrainLauncher",
    "Trainer",
]
