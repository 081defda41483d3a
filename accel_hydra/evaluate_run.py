"""``accel-hydra-train --resume RUN_DIR --validate``: evaluate a run's checkpoint.

The run's saved config builds the same objects as training would; instead of
``train()``, :meth:`LoopBase.validate` loads the checkpoint's weights and runs the
validation loop. Nothing is written into the run directory: no ``config.yaml``, no run
lock, no logs, no checkpoint.
"""

from __future__ import annotations

import json
from typing import Any

from accel_hydra.launcher import ConfigError, TrainLauncher

__all__ = ["DEFAULT_CHECKPOINT", "default_checkpoint", "format_metrics", "validate_run"]

#: What ``--validate`` without a value means: ``best`` when the run has one, else ``latest``.
DEFAULT_CHECKPOINT = "best-or-latest"


def default_checkpoint(trainer: Any) -> str:
    """``best`` when the trainer's ``checkpoint_dir`` holds a committed one, else ``latest``."""
    store = getattr(trainer, "checkpoint_store", None)
    if store is None:
        raise ConfigError(
            f"{type(trainer).__name__} has no CheckpointMixin, so the run has no checkpoints "
            "to validate; use a trainer with CheckpointMixin"
        )
    return "best" if "best" in store.committed() else "latest"


def format_metrics(metrics: dict[str, float], as_json: bool = False) -> str:
    """One ``name: value`` line per metric (sorted; values exact), or one JSON object."""
    if as_json:
        return json.dumps(metrics, sort_keys=True)
    return "\n".join(f"{name}: {value!r}" for name, value in sorted(metrics.items()))


def validate_run(
    launcher: TrainLauncher, checkpoint: str, as_json: bool = False
) -> dict[str, float]:
    """Build the run of ``launcher``'s config, validate ``checkpoint``, print the metrics.

    Args:
        launcher: a launcher over the run's saved config (with the ``--resume``
            overrides that point it at the run directory).
        checkpoint: a checkpoint name, ``latest``, a path or URL, or
            :data:`DEFAULT_CHECKPOINT`.
        as_json: print one JSON object instead of a line per metric.

    Returns:
        The metrics, agreed on every process (the main process prints them).

    Raises:
        ConfigError: the config cannot be built, or the checkpoint cannot be found,
            verified or loaded into the model (one line).
    """
    from accelerate.utils import set_seed

    from accel_hydra.state_mismatch import CheckpointMismatchError
    from accel_hydra.storage import CheckpointCorruptError, CheckpointNotFoundError

    launcher.register_resolvers()
    config = launcher.load_config()
    if config.get("seed") is not None:
        set_seed(config.seed)  # the model is built as training built it
    trainer = launcher.build_trainer(config)
    if trainer.val_dataloader is None:
        raise ConfigError(
            f"{launcher.config_path} has no val_dataloader: --validate needs one; add a "
            "val_dataloader section (or -o +val_dataloader=...)"
        )
    if checkpoint == DEFAULT_CHECKPOINT:
        checkpoint = default_checkpoint(trainer)
    try:
        metrics = trainer.validate(checkpoint=checkpoint)
    except (CheckpointNotFoundError, CheckpointCorruptError, CheckpointMismatchError) as err:
        raise ConfigError(f"--validate {checkpoint}: {err}") from None
    if trainer.accelerator.is_main_process:
        print(format_metrics(metrics, as_json), flush=True)
    return metrics
