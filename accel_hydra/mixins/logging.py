"""LoggingMixin: scalars to tensorboardX event files, also via ``accelerator.log``."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
from accelerate.tracking import GeneralTracker
from fsspec.implementations.local import LocalFileSystem

from accel_hydra.loop import LoopBase
from accel_hydra.redaction import redact

__all__ = ["LoggingMixin", "TensorBoardXTracker"]


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
                self.writer.add_scalar(key, value, global_step=step)


@dataclass(kw_only=True, eq=False)
class LoggingMixin(LoopBase):
    """Log training and validation scalars.

    Every ``log_every_n_steps`` updates it logs ``train/loss`` (the mean since the last
    log), ``train/lr`` (the rate the update used), ``train/grad_norm`` (when gradient
    clipping computed one) and ``train/samples_per_sec``; after each validation, every
    metric as ``val/<name>``; at the start, the run's ``config_dict`` as text, with
    credentials hidden.

    A remote ``log_dir`` (``s3://...``) is not written directly: tensorboardX's own
    cloud writers upload the whole event file again on every flush. Event files are
    written to a local cache and copied to ``log_dir`` after each checkpoint and when
    training ends.

    Logs are as exact as checkpoints: the event files are flushed (and copied) at every
    checkpoint, so what a checkpoint covers is on disk when it commits; a resumed run
    opens its writer with tensorboardX's ``purge_step`` at the resumed update, so
    TensorBoard drops what the interrupted run logged after it and shows every step
    exactly once, with the values of an uninterrupted run.

    Args:
        log_dir: where event files go, a path or fsspec URL; default ``{project_dir}/logs``.
        log_storage_options: fsspec options for a remote ``log_dir``; default: the
            checkpoint's ``storage_options`` (when the trainer has them).
        log_every_n_steps: log every this many optimizer updates. The loss is moved
            off the device only on these steps.
        report_to: ``"tensorboard"`` (tensorboardX) or ``None`` (log nothing).
    """

    log_dir: str | None = None
    log_every_n_steps: int = 50
    report_to: Literal["tensorboard"] | None = "tensorboard"
    log_storage_options: dict | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.report_to not in ("tensorboard", None):
            raise ValueError(f"report_to must be 'tensorboard' or None, got {self.report_to!r}")
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
        self._lr_of_update: float | None = None

    def log(self, values: dict[str, Any], step: int | None = None) -> None:
        """Write scalars (floats or scalar tensors) at ``step`` (default: ``self.step``).

        Call it from any process; only the main process writes.
        """
        if self._writer is None:
            return
        for key, value in values.items():
            if value is None:
                continue
            value = value.item() if hasattr(value, "item") else value
            self._writer.add_scalar(key, value, global_step=self.step if step is None else step)

    def _is_logging_step(self) -> bool:
        return super()._is_logging_step() or self.progress.step % self.log_every_n_steps == 0

    def _writable_dirs(self) -> list[tuple[str, str | None, dict | None]]:
        dirs = super()._writable_dirs()
        if self.report_to is not None:
            options = self.log_storage_options
            if options is None:
                options = getattr(self, "storage_options", None)
            dirs.append(("log_dir", self.log_dir, options))
        return dirs

    def _before_training(self) -> None:
        # Not at _after_prepare: a run that fails to restore must not leave event files.
        super()._before_training()
        if self.report_to is None or not self.accelerator.is_main_process:
            return
        self._open_writer()
        if self.config_dict:
            self._tracker.store_init_configuration(self.config_dict)

    def _open_writer(self, purge_step: int | None = None) -> None:
        from tensorboardX import SummaryWriter  # imported late: only the writer needs it

        # tensorboardX names files by the second and host only; a writer reopened in
        # the same second would truncate the previous file.
        suffix = f".{os.getpid()}" + ("" if purge_step is None else f".from_step_{purge_step}")
        self._writer = SummaryWriter(
            logdir=self._local_log_dir, purge_step=purge_step, filename_suffix=suffix
        )
        self._tracker = TensorBoardXTracker(self._writer)
        self.accelerator.trackers.append(self._tracker)

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        if self._writer is None:
            return
        # Anything logged after the resumed update belongs to a run that was cut off
        # (a SIGKILL after a later flush): readers purge events from step + 1 on.
        self._writer.close()
        self.accelerator.trackers.remove(self._tracker)
        self._open_writer(purge_step=self.step + 1)

    def _before_optimizer_step(self) -> None:
        super()._before_optimizer_step()
        if (self.progress.step + 1) % self.log_every_n_steps == 0:
            self._lr_of_update = self.optimizer.param_groups[0]["lr"]  # type: ignore[union-attr]

    def _after_update(self) -> None:
        super()._after_update()
        if self._writer is None or self.progress.step % self.log_every_n_steps:
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
        self._writer.flush()
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
        if self._writer is not None:
            self._writer.close()
            self.accelerator.trackers.remove(self._tracker)
            self._writer = None
            if self._log_fs is not None:
                self._upload_logs()

    def _summary_lines(self) -> list[tuple[str, str]]:
        lines = super()._summary_lines()
        where = redact(self.log_dir) if self.report_to else "off"
        if self.report_to and self._log_fs is not None:
            where += f" (written to {self._local_log_dir}, copied at checkpoints and the end)"
        lines.append(("logs", f"{where} (every {self.log_every_n_steps} updates)"))
        return lines


def _as_code_block(values: dict) -> str:
    text = json.dumps(values, indent=2, sort_keys=True, default=str)
    return "\n".join("    " + line for line in text.splitlines())
