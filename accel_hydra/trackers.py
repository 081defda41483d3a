"""Experiment trackers beside TensorBoard: which ones, how to start and continue them.

The tracker clients are Accelerate's own (``accelerate.tracking``: ``WandBTracker``,
``MLflowTracker``...); this module only chooses them, checks their packages are
installed, starts them with the user's ``tracker_kwargs`` and, on a resumed run, with
the run id the checkpoint recorded, so the same tracker run continues.

Each Accelerate tracker class is built as ``Accelerator.init_trackers`` builds it
(``cls(project, [logging_dir,] **kwargs)``, then ``start()``), one at a time: each
tracker gets its own project name, and the id of the run to continue is only known
once the checkpoint is restored, long after the ``Accelerator`` exists.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from accelerate.tracking import LOGGER_TYPE_TO_CLASS, GeneralTracker
from accelerate.utils import (
    is_aim_available,
    is_clearml_available,
    is_comet_ml_available,
    is_dvclive_available,
    is_mlflow_available,
    is_swanlab_available,
    is_wandb_available,
)

__all__ = [
    "DEFAULT_PROJECT",
    "TRACKERS",
    "check_tracker_kwargs",
    "continue_kwargs",
    "drop_logged_steps",
    "resolve_report_to",
    "run_ids",
    "start_tracker",
]

#: Every name ``report_to`` accepts (besides ``"all"``); ``tensorboard`` is tensorboardX.
TRACKERS = ("tensorboard", "wandb", "mlflow", "swanlab", "aim", "comet_ml", "clearml", "dvclive")

#: Whether each Accelerate-integrated tracker's package is importable (Accelerate's own
#: checks: a tracker it finds missing it would silently leave out).
_AVAILABLE: dict[str, Callable[[], bool]] = {
    "wandb": is_wandb_available,
    "mlflow": is_mlflow_available,
    "swanlab": is_swanlab_available,
    "aim": is_aim_available,
    "comet_ml": is_comet_ml_available,
    "clearml": is_clearml_available,
    "dvclive": is_dvclive_available,
}

#: The keyword of each tracker's own init call that Accelerate fills from its first
#: argument (the "project"); a user who sets it in ``tracker_kwargs`` names the project.
_PROJECT_KEY = {
    "wandb": "project",
    "mlflow": "experiment_name",
    "swanlab": "project",
    "aim": "name",
    "comet_ml": "project_name",
    "clearml": "project_name",
    "dvclive": "run_name",
}

#: The project name when ``tracker_kwargs`` names none.
DEFAULT_PROJECT = "accel_hydra"

# Run ids come from checkpoints (untrusted): W&B ids and MLflow run ids are short
# alphanumeric strings.
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def resolve_report_to(report_to: str | Sequence[str] | None) -> tuple[str, ...]:
    """The trackers to log to, in order, each once; ``"all"`` means every installed one.

    Raises:
        ValueError: an unknown tracker name.
        ImportError: a named tracker's package is not installed (one line naming the
            pip extra that installs it).
    """
    if report_to is None:
        return ()
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    chosen: list[str] = []
    for name in names:
        if name == "all":
            installed = [n for n in TRACKERS[1:] if _AVAILABLE[n]()]
            chosen.extend(["tensorboard", *installed])
            continue
        if name not in TRACKERS:
            raise ValueError(
                f"report_to: unknown tracker {name!r}; use one or a list of "
                f"{', '.join(TRACKERS)}, or 'all' (every installed one), or None"
            )
        if name != "tensorboard" and not _AVAILABLE[name]():
            raise ImportError(
                f"report_to includes {name!r} but its package is not installed; "
                f"run: pip install accel_hydra[{name}]"
            )
        chosen.append(name)
    return tuple(dict.fromkeys(chosen))


def check_tracker_kwargs(trackers: Sequence[str], tracker_kwargs: Mapping[str, Any]) -> None:
    """Refuse ``tracker_kwargs`` for a tracker that is not logged to, or not a dict."""
    for name, kwargs in tracker_kwargs.items():
        if name not in trackers or name == "tensorboard":
            raise ValueError(
                f"tracker_kwargs has an entry for {name!r}, which is not among the trackers "
                f"logged to ({', '.join(trackers) or 'none'}); add it to report_to or remove it"
            )
        if not isinstance(kwargs, Mapping):
            raise ValueError(
                f"tracker_kwargs[{name!r}] must be a dict of keyword arguments, "
                f"got {type(kwargs).__name__}"
            )


def start_tracker(name: str, kwargs: Mapping[str, Any], logging_dir: str) -> GeneralTracker:
    """Build and start Accelerate's tracker ``name`` with the user's ``kwargs``.

    ``logging_dir`` goes to the trackers that ask Accelerate for one (Aim's repository).
    """
    kwargs = dict(kwargs)
    project = kwargs.pop(_PROJECT_KEY[name], DEFAULT_PROJECT)
    tracker_class = LOGGER_TYPE_TO_CLASS[name]
    if tracker_class.requires_logging_directory:
        tracker = tracker_class(project, logging_dir, **kwargs)
    else:
        tracker = tracker_class(project, **kwargs)
    tracker.start()
    return tracker


def run_ids(trackers: Sequence[GeneralTracker]) -> dict[str, str]:
    """The id of each started tracker's run that a resumed run can continue."""
    ids = {}
    for tracker in trackers:
        if tracker.name == "wandb":
            ids["wandb"] = str(tracker.run.id)
        elif tracker.name == "mlflow":
            ids["mlflow"] = str(tracker.active_run.info.run_id)
    return ids


def continue_kwargs(name: str, run_id: Any) -> dict[str, Any]:
    """The init keyword arguments that make tracker ``name`` continue run ``run_id``.

    Raises:
        ValueError: ``run_id`` (read from a checkpoint) is not a plausible run id.
    """
    if not isinstance(run_id, str) or not _RUN_ID.match(run_id):
        raise ValueError(
            f"the checkpoint's tracker_runs[{name!r}] is not a run id: {str(run_id)[:80]!r}; "
            "the trainer state is damaged"
        )
    if name == "wandb":
        return {"id": run_id, "resume": "allow"}
    if name == "mlflow":
        return {"run_id": run_id}
    return {}


def drop_logged_steps(tracker: GeneralTracker) -> None:
    """Make a continued tracker run skip the points it already holds.

    A run killed after its last checkpoint had logged some steps past it; the resumed
    run logs them again. MLflow appends a second point for the same step, so here each
    metric's last logged step is read back once, and the tracker's ``log`` leaves out
    points at or before it (under exact resume they equal the ones kept). W&B needs
    nothing: a resumed W&B run ignores steps below its current one.
    """
    if tracker.name != "mlflow":
        return
    from mlflow import MlflowClient

    client = MlflowClient()
    run_id = tracker.active_run.info.run_id
    last_step = {
        key: max(point.step for point in client.get_metric_history(run_id, key))
        for key in client.get_run(run_id).data.metrics
    }
    if not last_step:
        return
    log = tracker.log

    def log_new_points(values: dict, step: int | None = None, **kwargs: Any) -> None:
        if step is not None:
            values = {k: v for k, v in values.items() if step > last_step.get(k, -1)}
        if values:
            log(values, step=step, **kwargs)

    # An instance attribute, so accelerator.log and get_tracker("mlflow") still see
    # Accelerate's MLflowTracker, with every other method as it is.
    tracker.log = log_new_points
