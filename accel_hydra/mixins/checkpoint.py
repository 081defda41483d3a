"""CheckpointMixin: when to save and what to resume from; the store does the bytes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from accel_hydra.mixins.monitoring import MetricMonitoringMixin
from accel_hydra.retention import checkpoint_order, checkpoints_to_prune
from accel_hydra.storage import CheckpointCorruptError, CheckpointStore

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
        async_upload: upload remote checkpoints in the background (remote storage).

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
        if accelerator.is_main_process:
            store.clear_staging(name)
        accelerator.wait_for_everyone()
        accelerator.save_state(staged)
        if accelerator.is_main_process:
            torch.save(self._state_to_save(), os.path.join(staged, TRAINER_STATE_FILE))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            step, epoch, batches = self._progress()
            store.commit(name, staged, {"step": step, "epoch": epoch, "batches_in_epoch": batches})
            self._prune(newest=name)
        accelerator.wait_for_everyone()
        self._last_saved = self._progress()
        self._last_saved_name = name
        return True

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

    def _restore_from(self, store: CheckpointStore, name: str) -> None:
        self.load_checkpoint(store.fetch(name), label=store.display(name))
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
            raise CheckpointCorruptError(
                f"checkpoint {label} could not be loaded: {type(err).__name__}: {err}"
            ) from err
        self._load_state(state)

    def _state_to_save(self) -> dict[str, Any]:
        state = super()._state_to_save()
        state["best_checkpoint"] = self.best_checkpoint
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        self.best_checkpoint = state.get("best_checkpoint")

    def _summary_lines(self) -> list[tuple[str, str]]:
        lines = super()._summary_lines()
        lines.append(("checkpoints", self.checkpoint_store.display()))
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
