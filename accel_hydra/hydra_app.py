"""``python -m accel_hydra.hydra_app``: the same training job behind Hydra's own CLI.

``accel-hydra-train`` composes configs with Hydra's compose API and runs sweeps one
after another in its own process. To hand jobs to Hydra's launcher plugins instead
(SLURM through ``hydra/launcher=submitit_slurm``, from the ``hydra-submitit-launcher``
package), run the job through this module, which is a plain ``@hydra.main`` app::

    python -m accel_hydra.hydra_app --config-dir examples/digits/configs \\
        --config-name train -m hydra/launcher=submitit_slurm \\
        hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=1 \\
        'trainer.project_dir=${hydra:runtime.output_dir}' optimizer.lr=1e-3,1e-2

(``trainer.project_dir`` set from Hydra's job directory gives every job its own.)

Every Hydra flag works (``--cfg job``, ``--info``, ``-m``...). Set
``ACCEL_HYDRA_LAUNCHER=pkg.module.Class`` to build the run with a ``TrainLauncher``
subclass.
"""

from __future__ import annotations

import importlib
import os
import sys

import hydra
from omegaconf import DictConfig

from accel_hydra.launcher import TrainLauncher

__all__ = ["main"]


def _launcher() -> TrainLauncher:
    dotted = os.environ.get("ACCEL_HYDRA_LAUNCHER")
    if not dotted:
        return TrainLauncher("<hydra>")
    module_name, _, class_name = dotted.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)("<hydra>")


@hydra.main(version_base=None, config_path=None, config_name=None)
def main(config: DictConfig) -> None:
    """Build and train the run described by the composed ``config``."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    launcher = _launcher()
    # The job saves its config.yaml, so the console script can continue it.
    launcher.resume_advice = "run `accel-hydra-train --resume {run_dir}`"
    launcher.register_resolvers()
    launcher.run_config(config)


if __name__ == "__main__":
    main()
