"""CheckpointMixin: when to save and what to resume from; the store does the bytes."""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from accelerate.utils import broadcast_object_list, gather_object

from accel_hydra.mixins.monitoring import MetricMonitoringMixin
from accel_hydra.redaction import redact
from accel_hydra.retention import checkpoint_order, checkpoints_to_prune
from accel_hydra.state_mismatch import CheckpointMismatchError, describe_mismatch
from accel_hydra.storage import CheckpointCorruptError, CheckpointStore
from accel_hydra.uploader import BackgroundUploader, CheckpointUploadError

__all__ = ["CheckpointMixin", "TRAINER_STATE_FILE"]

#: The trainer's own state inside a checkpoint (progress, monitor, scheduler...).
TRAINER_STATE_FILE = "accel_hydra_trainer_state.pt"


@dataclass(kw_only=True, eq=False)
class CheckpointMixin(MetricMonitoringMixin):
    """Save checkpoints during training and resume from one.

    A checkpoint ``<checkpoint_dir>/<name>/`` holds Accelerate's state (model,
    optimizer, gradient scaler, per-process RNG, sampler, ``checkpoint_objects``) and
    the trainer's own (epoch, update step, position inside the epoch, monitored metric,
    LR scheduler). It counts only once its commit marker, written last, is stored.

    Args:
        checkpoint_dir: a path or fsspec URL; default ``{project_dir}/checkpoints``.
        storage_options: keyword arguments for the fsspec filesystem.
        save_every_n_steps: save ``step_<n>`` every this many optimizer updates.
        save_every_n_epochs: save ``epoch_<n>`` every this many epochs and after the
            last one; ``None`` saves none.
        save_last_k: keep this many ``step_*``/``epoch_*`` checkpoints (committed ones,
            newest by training progress); ``None`` keeps all. ``best``, permanent ones
            and the one this run resumed from are never deleted.
        permanent_save_every_n_steps: also save ``permanent_step_<n>`` every this many
            updates, never pruned.
        resume_from_checkpoint: a checkpoint name in ``checkpoint_dir`` (``best``,
            ``step_100``), a path or URL to a checkpoint directory, or ``"latest"`` (the
            newest committed checkpoint; a fresh run when there is none).
        async_upload: for a remote ``checkpoint_dir``, upload in a background thread:
            training goes on as soon as the local stage is written. At most one upload
            is in flight (the next save waits for it); ``train()`` waits for the last
            one before it returns, also after an error or a preemption. A failed
            upload is retried (:attr:`upload_retry_delays`), then raised naming the URL.
            Ignored for local paths, which are committed by a rename.

    Attributes:
        best_checkpoint: where the ``best`` checkpoint was last saved, or ``None``.
        resumed_from: where this run resumed from, or ``None``.
    """

    checkpoint_dir: str | None = None
    storage_options: dict | None = None
    save_every_n_steps: int | None = None
    save_every_n_epochs: int | None = 1
    save_last_k: int | None = 1
    permanent_save_every_n_steps: int | None = None
    resume_from_checkpoint: str | None = None
    async_upload: bool = True

    #: Seconds between the attempts of a failed upload (one retry per entry).
    upload_retry_delays: ClassVar[tuple[float, ...]] = (1.0, 4.0, 16.0)

    @property
    def checkpoint_objects(self) -> list[Any]:
        """Extra objects (with ``state_dict``/``load_state_dict``) saved in every checkpoint.

        Override to add, for example, an EMA of the weights or a data-curriculum state.
        """
        return []

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in (
            "save_every_n_steps",
            "save_every_n_epochs",
            "permanent_save_every_n_steps",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.save_last_k is not None and self.save_last_k < 1:
            raise ValueError(f"save_last_k must be >= 1 or None, got {self.save_last_k}")
        if self.checkpoint_dir is None:
            self.checkpoint_dir = os.path.join(self.project_dir, "checkpoints")
        self.checkpoint_dir = str(self.checkpoint_dir)
        self.checkpoint_store = CheckpointStore(self.checkpoint_dir, self.storage_options)
        self.best_checkpoint: str | None = None
        self.resumed_from: str | None = None
        self._last_saved: tuple[int, int, int] | None = None
        self._last_saved_name: str | None = None
        self._uploader = BackgroundUploader(self.upload_retry_delays)

    # ----------------------------------------------------------------- saving

    def save_checkpoint(self, name: str) -> bool:
        """Save the full training state as checkpoint ``name``; call on every process.

        Returns:
            True when the checkpoint was committed, False when a mixin vetoed the save
            (for example after a non-finite loss).
        """
        if not self._ok_to_save():
            return False
        accelerator = self.accelerator
        store = self.checkpoint_store
        staged = store.staging_dir(name)
        # The upload in flight may read this very stage (``best`` again): finish it first.
        self._wait_for_uploads_on_every_process()
        if accelerator.is_local_main_process:
            store.clear_staging(name)
        accelerator.wait_for_everyone()
        accelerator.save_state(staged)
        if accelerator.is_main_process:
            torch.save(self._state_to_save(), os.path.join(staged, TRAINER_STATE_FILE))
        accelerator.wait_for_everyone()
        step, epoch, batches = self._progress()
        info = {"step": step, "epoch": epoch, "batches_in_epoch": batches}
        if store.is_remote and self._stages_per_machine():
            self._upload_from_every_machine(name, staged, info)
        elif store.is_remote:
            if accelerator.is_main_process:
                self._uploader.submit(
                    lambda: store.commit(name, staged, info),
                    store.display(name),
                    on_failure=f"Its files are kept in {staged}; check the URL, credentials "
                    "and storage_options.",
                    after=lambda: self._prune(newest=name),
                )
            if not self.async_upload:  # the same upload and retries, waited for here
                self._wait_for_uploads_on_every_process()
        elif accelerator.is_main_process:
            store.commit(name, staged, info)
            self._prune(newest=name)
        accelerator.wait_for_everyone()
        self._last_saved = self._progress()
        self._last_saved_name = name
        self._after_checkpoint(name)
        return True

    def wait_for_uploads(self) -> None:
        """Block until the checkpoint upload in flight is committed (main process).

        Raises:
            CheckpointUploadError: it failed after every retry.
        """
        if self.accelerator.is_main_process:
            self._uploader.wait()

    def _wait_for_uploads_on_every_process(self) -> None:
        """Like :meth:`wait_for_uploads`, but a failure stops every process, not only
        the main one that ran the upload (the others would wait for it forever)."""
        error = message = None
        if self.accelerator.is_main_process:
            try:
                self._uploader.wait()
            except CheckpointUploadError as err:
                error, message = err, str(err)
        if self.accelerator.num_processes > 1:
            message = broadcast_object_list([message])[0]
        if error is not None:
            raise error
        if message is not None:
            raise CheckpointUploadError(message)

    def _stages_per_machine(self) -> bool:
        """Whether processes run on several machines, each staging on its own disk."""
        per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", self.accelerator.num_processes))
        return self.accelerator.num_processes > per_machine

    def _upload_from_every_machine(self, name: str, staged: str, info: dict) -> None:
        """Each machine uploads what its processes staged; then the marker, once.

        Synchronous: the marker must list every machine's files, which needs all of
        them to meet after their uploads.
        """
        accelerator, store = self.accelerator, self.checkpoint_store
        if accelerator.is_main_process:
            store.clear_target(name)
        accelerator.wait_for_everyone()
        uploaded = store.upload(name, staged) if accelerator.is_local_main_process else {}
        if accelerator.is_main_process:
            files = {}
            for part in gather_object([uploaded]):
                files.update(part)
            store.write_marker(name, info, files)
            self._prune(newest=name)
        else:
            gather_object([uploaded])
        accelerator.wait_for_everyone()
        if accelerator.is_local_main_process:
            shutil.rmtree(staged, ignore_errors=True)

    def _progress(self) -> tuple[int, int, int]:
        return (self.step, self.epoch, self._batches_in_epoch)

    def _prune(self, newest: str) -> None:
        protected = {self.resumed_from} if self.resumed_from else set()
        committed = self.checkpoint_store.committed()
        for name in checkpoints_to_prune(committed, self.save_last_k, protected, newest):
            self.checkpoint_store.delete(name)

    def _on_interrupt(self) -> str | None:
        super()._on_interrupt()
        if self._last_saved != self._progress():
            name = f"step_{self.step}"
            if not self.save_checkpoint(name):
                return None
        elif self._last_saved_name is None:  # resumed and interrupted before any update
            return self.resumed_from and self.checkpoint_store.display(self.resumed_from)
        # The grace period before SIGKILL is short: the checkpoint must be stored now.
        self.wait_for_uploads()
        return self.checkpoint_store.display(self._last_saved_name)

    def _after_update(self) -> None:
        super()._after_update()
        if self.save_every_n_steps and self.step % self.save_every_n_steps == 0:
            self.save_checkpoint(f"step_{self.step}")
        if self.permanent_save_every_n_steps and self.step % self.permanent_save_every_n_steps == 0:
            self.save_checkpoint(f"permanent_step_{self.step}")

    def _epoch_end_checkpoint(self, metrics: dict[str, Any]) -> None:
        super()._epoch_end_checkpoint(metrics)
        every = self.save_every_n_epochs
        if every and (self.epoch % every == 0 or self.epoch == self.epochs):
            self.save_checkpoint(f"epoch_{self.epoch}")
        if self.metric_improved and self.save_checkpoint("best"):
            self.best_checkpoint = self.checkpoint_store.display("best")

    # ----------------------------------------------------------------- resuming

    def _writable_dirs(self) -> list[tuple[str, str, dict | None]]:
        mine = ("checkpoint_dir", self.checkpoint_dir, self.storage_options)
        return [*super()._writable_dirs(), mine]

    def _after_prepare(self) -> None:
        super()._after_prepare()
        for obj in self.checkpoint_objects:
            self.accelerator.register_for_checkpointing(obj)
        if self.accelerator.is_main_process:
            self.checkpoint_store.recover()
        self.accelerator.wait_for_everyone()

    def _restore(self) -> None:
        super()._restore()
        target = self.resume_from_checkpoint
        if not target:
            return
        if target == "latest":
            self._restore_latest()
        else:
            self._restore_from(*self._resolve_resume_target(target))

    def _restore_latest(self) -> None:
        """Resume from the newest committed checkpoint that loads, skipping damaged ones."""
        store = self.checkpoint_store
        committed = store.committed()
        if not committed:
            self._say(f"accel_hydra: no committed checkpoint in {store.display()}: starting fresh")
            return
        newest_first = sorted(
            committed, key=lambda name: checkpoint_order(name, committed[name]), reverse=True
        )
        reasons = []
        for name in newest_first:
            try:
                self._restore_from(store, name)
                return
            except CheckpointCorruptError as err:
                reasons.append(str(err))
                self.accelerator.wait_for_everyone()
                if err.damaged and self.accelerator.is_main_process:
                    # Out of the way (kept, hidden), so it is never picked or counted again.
                    hidden = store.quarantine(name)
                    self._say(
                        f"accel_hydra: skipping {name}: {err}; moved it aside to "
                        f"{store.display(hidden)}"
                    )
                else:
                    self._say(f"accel_hydra: skipping {name}: {err}")
                self.accelerator.wait_for_everyone()
        raise CheckpointCorruptError(
            f"no checkpoint in {store.display()} could be loaded: " + "; ".join(reasons)
        )

    def _after_train(self) -> None:
        try:
            self.wait_for_uploads()
        finally:
            super()._after_train()

    def _restore_from(self, store: CheckpointStore, name: str) -> None:
        # One download per machine; its other processes read the same directory.
        local = store.fetch(name, download=self.accelerator.is_local_main_process)
        self.accelerator.wait_for_everyone()
        self.load_checkpoint(local, label=store.display(name))
        if store.url == self.checkpoint_store.url:
            self.resumed_from = name
        self._last_saved = self._progress()
        self._say(
            f"accel_hydra: resumed from {store.display(name)} "
            f"(epoch {self.epoch}, step {self.step}, batch {self._batches_in_epoch})"
        )

    def _resolve_resume_target(self, target: str) -> tuple[CheckpointStore, str | None]:
        if target == "latest":
            store = self.checkpoint_store
            return store, store.latest()
        if "/" not in target and os.sep not in target:
            return self.checkpoint_store, target
        parent, _, name = target.rstrip("/").rpartition("/")
        return CheckpointStore(parent or ".", self.storage_options), name

    def load_checkpoint(self, local_dir: str, label: str | None = None) -> None:
        """Restore the full training state from a local checkpoint directory.

        Args:
            local_dir: the checkpoint's files on local disk.
            label: how to name the checkpoint in errors (default: ``local_dir``).

        Raises:
            CheckpointCorruptError: its files cannot be read into the model, optimizer
                and the rest (damaged bytes, or a model that no longer matches).
            ValueError: the files load but do not fit this run's settings (for example
                a schedule sized for another number of updates).
        """
        label = label or local_dir
        state_file = os.path.join(local_dir, TRAINER_STATE_FILE)
        if not os.path.exists(state_file):
            raise FileNotFoundError(
                f"{label} is not an accel_hydra checkpoint: {TRAINER_STATE_FILE} is missing"
            )
        try:
            self.accelerator.load_state(local_dir)
            state = torch.load(state_file, map_location="cpu", weights_only=False)
        except Exception as err:
            mismatch = describe_mismatch(err)
            if mismatch:  # the files are fine: another checkpoint would not fit either
                raise CheckpointMismatchError(
                    f"checkpoint {label} does not fit this model: {mismatch}; build the "
                    "model with the settings of the run that saved it, or start a new run"
                ) from err
            raise CheckpointCorruptError(
                f"checkpoint {label} could not be loaded: {type(err).__name__}: {err}"
            ) from err
        self._load_state(state)

    def _state_to_save(self) -> dict[str, Any]:
        state = super()._state_to_save()
        # A name relative to checkpoint_dir: a moved or copied run points at its own.
        state["best_checkpoint"] = "best" if self.best_checkpoint else None
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        saved = state.get("best_checkpoint")
        # Older checkpoints stored a full path; only its last part names the checkpoint.
        name = str(saved).rstrip("/").rsplit("/", 1)[-1] if saved else None
        self.best_checkpoint = self.checkpoint_store.display(name) if name else None

    def _summary_lines(self) -> list[tuple[str, str]]:
        lines = super()._summary_lines()
        store = self.checkpoint_store
        where = redact(store.display())
        if store.is_remote:
            where += f" (staged in {store.staging_root}, "
            where += "uploaded in the background)" if self.async_upload else "uploaded)"
        lines.append(("checkpoints", where))
        if self.storage_options:
            lines.append(("storage options", str(redact(self.storage_options))))
        if self.resumed_from:
            lines.append(("resumed from", self.resumed_from))
        return lines

    def _end_summary_lines(self) -> list[tuple[str, str]]:
        lines = super()._end_summary_lines()
        monitor = self.metric_monitor
        if monitor is not None and monitor.best_value is not None:
            lines.append((f"best {monitor.metric_name}", f"{monitor.best_value:.6g}"))
        if self.best_checkpoint:
            lines.append(("best checkpoint", self.best_checkpoint))
        return lines
