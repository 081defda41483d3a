"""Upstream AccelHydra's import path of :class:`~accel_hydra.TrainLauncher`.

Kept so ``-l accel_hydra.train_launcher.TrainLauncher`` and
``from accel_hydra.train_launcher import TrainLauncher`` in upstream launch scripts
keep working; the class lives in :mod:`accel_hydra.launcher`.
"""

from accel_hydra.launcher import TrainLauncher

__all__ = ["TrainLauncher"]
