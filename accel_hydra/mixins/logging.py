"""LoggingMixin: scalars to tensorboardX event files and Accelerate's trackers."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import fsspec
from accelerate.tracking import GeneralTracker
from fsspec.implementations.local import LocalFileSystem

from accel_hydra.event_files import add_scalar, flush_event_files, write_directly
from accel_hydra.loop import LoopBase
from accel_hydra.redaction import redact
from accel_hydra.trackers import (
    check_tracker_kwargs,
    continue_kwargs,
    drop_logged_steps,
    resolve_report_to,
    run_ids,
    start_tracker,
)

__all__ = ["LoggingMixin", "TensorBoardXTracker", "TrackerName"]

#: A tracker ``report_to`` names (``"all"``: every installed one).
TrackerName = Literal[
    "tensorboard", "wandb", "mlflow", "swanlab", "aim", "comet_ml", "clearml", "dvclive", "all"
]


class TensorBoardXTracker(GeneralTracker):
    """An Accelerate tracker writing into the trainer's own tensorboardX writer.

    Registered on the accelerator, it makes a user's ``self.accelerator.log({...},
    step=self.step)`` land in the same event files as the trainer's own scalars.
    """

    name = "accel_hydra_tensorboardx"
    requires_logging_directory = False

    def __init__(self, writer: Any) -> None:
        super().__init__()
        self.writer = writer

    @property
    def tracker(self) -> Any:
        return self.writer

    def store_init_configuration(self, values: dict) -> None:
        self.writer.add_text("config", _as_code_block(redact(values)))

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        for key, value in values.items():
            if isinstance(value, str):
                self.writer.add_text(key, value, global_step=step)
            else:
                value = value.item() if hasattr(value, "item") else value
                add_scalar(self.writer, key, value, step)


@dataclass(kw_only=True, eq=False)
class LoggingMixin(LoopBase):
    """Log training and validation scalars to TensorBoard and any experiment tracker.

    Every ``log_every_n_steps`` updates it logs ``train/loss`` (the mean since the last
    log), ``train/lr`` (the rate the update used), ``train/grad_norm`` (when gradient
    clipping computed one) and ``train/samples_per_sec``; after each validation, every
    metric as ``val/<name>``; at the start, the run's ``config_dict`` (credentials
    hidden) as text in TensorBoard and as the run's parameters in the other trackers.
    Each value goes to every tracker in ``report_to``, and so does what you log with
    :meth:`log` or ``self.accelerator.log``. Only the main process logs.

    The trackers other than TensorBoard are Accelerate's own integrations
    (``accelerate.tracking``), started with ``tracker_kwargs[name]``. Their run ids are
    stored in every checkpoint: a resumed run continues the same W&B run
    (``id``, ``resume="allow"``) and MLflow run (``run_id``); the other trackers start
    a new run (continue one yourself through ``tracker_kwargs``).

    A remote ``log_dir`` (``s3://...``) is not written directly: tensorboardX's own
    cloud writers upload the whole event file again on every flush. Event files are
    written to a local cache and copied to ``log_dir`` after each checkpoint and when
    training ends.

    Logs are as exact as checkpoints: the event files are flushed (and copied) at every
    checkpoint, so what a checkpoint covers is on disk when it commits; a resumed run
    opens its writer with tensorboardX's ``purge_step`` at the resumed update, so
    TensorBoard drops what the interrupted run logged after it and shows every step
    exactly once, with the values of an uninterrupted run. A continued MLflow run keeps
    the points the interrupted run logged and is not sent them again; a continued W&B
    run ignores steps below its current one by itself.

    Args:
        log_dir: where event files go, a path or fsspec URL; default ``{project_dir}/logs``.
        log_storage_options: fsspec options for a remote ``log_dir``; default: the
            checkpoint's ``storage_options`` (when the trainer has them).
        log_every_n_steps: log every this many optimizer updates. The loss is moved
            off the device only on these steps.
        report_to: a tracker or a list of them: ``"tensorboard"`` (tensorboardX, the
            default), ``"wandb"``, ``"mlflow"``, ``"swanlab"``, ``"aim"``,
            ``"comet_ml"``, ``"clearml"``, ``"dvclive"``; ``"all"`` for TensorBoard and
            every installed one; ``None`` to log nothing. A tracker whose package is
            missing fails at construction, naming the pip extra that installs it.
        tracker_kwargs: keyword arguments per tracker for its own init call (W&B's
            ``wandb.init``, Accelerate's ``MLflowTracker``...), for example
            ``{"wandb": {"project": "digits", "name": "lr-1e-3", "tags": ["cpu"]}}``.
            The project keyword (``project``, ``experiment_name`` for MLflow,
            ``project_name`` for Comet and ClearML) defaults to ``"accel_hydra"``.
    """

    log_dir: str | None = None
    log_every_n_steps: int = 50
    report_to: TrackerName | list[TrackerName] | None = "tensorboard"
    tracker_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    log_storage_options: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._tracker_names = resolve_report_to(self.report_to)
        self.tracker_kwargs = _plain(self.tracker_kwargs or {})
        check_tracker_kwargs(self._tracker_names, self.tracker_kwargs)
        if self.log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {self.log_every_n_steps}")
        if self.log_dir is None:
            self.log_dir = os.path.join(self.project_dir, "logs")
        self.log_dir = str(self.log_dir)
        options = self.log_storage_options
        if options is None:
            options = getattr(self, "storage_options", None)
        self._log_fs, self._log_root = fsspec.core.url_to_fs(self.log_dir, **(options or {}))
        if isinstance(self._log_fs, LocalFileSystem):
            self._log_fs = None
            self._local_log_dir = self.log_dir
        else:
            key = hashlib.sha1(self.log_dir.encode()).hexdigest()[:16]
            self._local_log_dir = os.path.join(tempfile.gettempdir(), "accel_hydra_logs", key)
        self._writer = None
        self._trackers: list[GeneralTracker] = []
        self._tracker_runs: dict[str, str] = {}
        self._continued_runs: dict[str, dict[str, Any]] = {}
        self._lr_of_update: float | None = None

    def log(self, values: dict[str, Any], step: int | None = None) -> None:
        """Log scalars (floats or scalar tensors) at ``step`` (default: ``self.step``)
        to every tracker.

        Call it from any process; only the main process logs.
        """
        if not self._trackers:  # started on the main process only (_before_training)
            return
        values = {
            key: value.item() if hasattr(value, "item") else value
            for key, value in values.items()
            if value is not None
        }
        step = self.step if step is None else step
        # What accelerator.log does, without building a PartialState per call.
        for tracker in self.accelerator.trackers:
            tracker.log(values, step=step)

    def _is_logging_step(self) -> bool:
        return super()._is_logging_step() or self.progress.step % self.log_every_n_steps == 0

    def _writable_dirs(self) -> list[tuple[str, str | None, dict | None]]:
        dirs = super()._writable_dirs()
        if "tensorboard" in self._tracker_names:
            options = self.log_storage_options
            if options is None:
                options = getattr(self, "storage_options", None)
            dirs.append(("log_dir", self.log_dir, options))
        return dirs

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        saved = state.get("tracker_runs") or {}
        if not isinstance(saved, dict):
            raise ValueError(
                f"the checkpoint's tracker_runs must be a dict of tracker -> run id, got "
                f"{type(saved).__name__}; the trainer state is damaged"
            )
        # Trackers of the interrupted run that this run does not log to are left alone.
        self._continued_runs = {
            name: continue_kwargs(name, run_id)
            for name, run_id in saved.items()
            if name in self._tracker_names
        }

    def _before_training(self) -> None:
        # Not at _after_prepare: a run that fails to restore must not leave event files
        # or tracker runs; after _restore, the run ids to continue are known.
        super()._before_training()
        if not self._tracker_names or not self.accelerator.is_main_process:
            return
        config = redact(self.config_dict) if self.config_dict else None
        for name in self._tracker_names:
            if name == "tensorboard":
                # A resumed run: TensorBoard drops what was logged after the checkpoint.
                self._open_writer(purge_step=self.step + 1 if self.step else None)
                if config:
                    self._trackers[-1].store_init_configuration(config)
                continue
            continued = self._continued_runs.get(name)
            kwargs = {**(continued or {}), **self.tracker_kwargs.get(name, {})}
            # Trackers that keep local files (Aim's repository) keep them in the run.
            tracker = start_tracker(name, kwargs, str(self.project_dir))
            self._add_tracker(tracker)  # from here on, _after_train finishes it
            if continued:
                drop_logged_steps(tracker)
            elif config:
                tracker.store_init_configuration(_flatten(config))
        self._tracker_runs = run_ids(self._trackers)

    def _add_tracker(self, tracker: GeneralTracker) -> None:
        self._trackers.append(tracker)
        self.accelerator.trackers.append(tracker)

    def _open_writer(self, purge_step: int | None = None) -> None:
        from tensorboardX import SummaryWriter  # imported late: only the writer needs it

        # tensorboardX names files by the second and host only; a writer reopened in
        # the same second would truncate the previous file.
        suffix = f".{os.getpid()}" + ("" if purge_step is None else f".from_step_{purge_step}")
        self._writer = SummaryWriter(
            logdir=self._local_log_dir, purge_step=purge_step, filename_suffix=suffix
        )
        # Events go straight to the file, on this thread: no queue, no worker threads
        # taking the GIL from training, and a flush at a checkpoint is a plain flush.
        write_directly(self._writer)
        self._add_tracker(TensorBoardXTracker(self._writer))

    def _state_to_save(self) -> dict[str, Any]:
        state = super()._state_to_save()
        state["tracker_runs"] = dict(self._tracker_runs)
        return state

    def _before_optimizer_step(self) -> None:
        super()._before_optimizer_step()
        if (self.progress.step + 1) % self.log_every_n_steps == 0:
            self._lr_of_update = self.optimizer.param_groups[0]["lr"]  # type: ignore[union-attr]

    def _after_update(self) -> None:
        super()._after_update()
        if not self._trackers or self.progress.step % self.log_every_n_steps:
            return
        self.log(
            {
                "train/loss": self.last_loss,
                "train/lr": self._lr_of_update,
                "train/grad_norm": self.last_grad_norm,
                "train/samples_per_sec": self.samples_per_second,
            }
        )

    def _after_validation(self, metrics: dict[str, Any]) -> None:
        super()._after_validation(metrics)
        self.log({f"val/{name}": value for name, value in metrics.items()})

    def sync_logs(self) -> None:
        """Flush the event files to disk and copy them to a remote ``log_dir``.

        Runs at every checkpoint (main process; elsewhere a no-op), so a run killed
        later has its logs up to that checkpoint on disk, ready for the resumed run.
        """
        if self._writer is None:
            return
        flush_event_files(self._writer)
        if self._log_fs is not None:
            self._upload_logs()

    def _upload_logs(self) -> None:
        root = self._local_log_dir
        for dirpath, _, filenames in os.walk(root):
            for filename in filenames:
                local = os.path.join(dirpath, filename)
                rel = os.path.relpath(local, root).replace(os.sep, "/")
                self._log_fs.put_file(local, f"{self._log_root.rstrip('/')}/{rel}")

    def _after_checkpoint(self, name: str) -> None:
        super()._after_checkpoint(name)
        self.sync_logs()

    def _after_train(self) -> None:
        super()._after_train()
        trackers, self._trackers = self._trackers, []
        try:
            for tracker in trackers:
                if tracker in self.accelerator.trackers:
                    self.accelerator.trackers.remove(tracker)
                if not isinstance(tracker, TensorBoardXTracker):  # the writer closes below
                    tracker.finish()
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
                if self._log_fs is not None:
                    self._upload_logs()

    def _summary_lines(self) -> list[tuple[str, str]]:
        lines = super()._summary_lines()
        names = self._tracker_names
        if "tensorboard" in names:
            where = redact(self.log_dir)
            if self._log_fs is not None:
                where += f" (written to {self._local_log_dir}, copied at checkpoints and the end)"
            lines.append(("logs", f"{where} (every {self.log_every_n_steps} updates)"))
        elif not names:
            lines.append(("logs", "off"))
        for name in names:
            if name == "tensorboard":
                continue
            run = self._tracker_runs.get(name)
            how = "continued" if name in self._continued_runs else "new"
            lines.append((f"tracker {name}", f"{how} run {run}" if run else how + " run"))
        return lines


def _as_code_block(values: dict) -> str:
    text = json.dumps(values, indent=2, sort_keys=True, default=str)
    return "\n".join("    " + line for line in text.splitlines())


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": 0.1}}`` as ``{"optimizer.lr": 0.1}``: trackers such as
    MLflow take flat parameters of plain values only."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(_flatten(value, prefix=f"{name}."))
        else:
            flat[name] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def _plain(value: Any) -> Any:
    """Hydra's DictConfig/ListConfig as dicts and lists: tracker clients check types."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return [_plain(v) for v in value]
    return value
