"""CheckpointMixin: when to save and what to resume from; the store does the bytes."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import safetensors.torch
from accelerate.utils import broadcast_object_list, gather_object

from accel_hydra.checkpoint_reading import (
    ReadCheckpoint,
    apply_checkpoint,
    read_checkpoint,
    reads_exactly,
)
from accel_hydra.distributed import DistributedStepError, fail_together
from accel_hydra.host_snapshot import (
    HostBuffers,
    HostSnapshot,
    pause_for_test,
    snapshot_is_exact,
    take_snapshot,
    write_snapshot,
)
from accel_hydra.init_weights import WEIGHT_FILES, read_weights_file
from accel_hydra.mixins.monitoring import MetricMonitoringMixin
from accel_hydra.preemption import PreemptionGuard, TrainingInterrupted
from accel_hydra.redaction import redact
from accel_hydra.retention import checkpoint_order, checkpoints_to_prune
from accel_hydra.run_lock import DEFAULT_LEASE_SECONDS, LocalRunLock, RemoteLease
from accel_hydra.safe_state import (
    UnsafeCheckpointError,
    check_code_free,
    check_stage_complete,
    load_object_state,
    load_trainer_state,
    pickle_capable_files,
    save_object_state,
    save_trainer_state,
)
from accel_hydra.state_mismatch import CheckpointMismatchError, describe_mismatch
from accel_hydra.storage import (
    DEFAULT_STORAGE_TIMEOUT,
    CheckpointCorruptError,
    CheckpointNotFoundError,
    CheckpointStore,
)
from accel_hydra.uploader import BackgroundUploader, CheckpointUploadError, UploadProgress

__all__ = ["CheckpointMixin", "TRAINER_STATE_FILE", "object_state_file", "tensor_file"]

#: The trainer's own state inside a checkpoint (progress, monitor, scheduler...), as JSON.
TRAINER_STATE_FILE = "accel_hydra_trainer_state.json"
# Checkpoints of accel_hydra 0.1 before the JSON state; still read, never unpickled freely.
_LEGACY_TRAINER_STATE_FILE = "accel_hydra_trainer_state.pt"


def object_state_file(index: int) -> str:
    """The file holding the state of ``checkpoint_objects[index]`` in a checkpoint."""
    return f"accel_hydra_object_{index}.pt"


# A stem names a file beside Accelerate's own: a plain word, never one of theirs.
_TENSOR_STEM = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}")
_ACCELERATE_STEM = re.compile(r"(model|optimizer|scheduler|sampler|scaler|random_states)(_\d+)?")


def tensor_file(stem: str) -> str:
    """The file of the extra tensors ``stem`` (from ``_tensors_to_save``) in a checkpoint.

    Raises:
        ValueError: ``stem`` is not a plain word, or is one of Accelerate's own files.
    """
    if not _TENSOR_STEM.fullmatch(stem) or _ACCELERATE_STEM.fullmatch(stem):
        raise ValueError(
            f"tensor file stem {stem!r} is not allowed: use a plain word of letters, digits, "
            "'_' or '-' (at most 64) that is not one of Accelerate's files (model, optimizer...)"
        )
    return f"{stem}.safetensors"


@dataclass(kw_only=True, eq=False)
class CheckpointMixin(MetricMonitoringMixin):
    """Save checkpoints during training and resume from one.

    A checkpoint ``<checkpoint_dir>/<name>/`` holds Accelerate's state (model,
    optimizer, gradient scaler, per-process RNG, sampler), the states of
    ``checkpoint_objects`` and the trainer's own as JSON (epoch, update step, position
    inside the epoch, monitored metric, LR scheduler). It counts only once its commit
    marker, written last, is stored. Loading it never runs code from it (see
    :mod:`accel_hydra.safe_state`).

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
        async_save: copy the state into host memory at each save (a memory copy;
            pinned and reused between saves when it lives on a GPU), then write and
            commit the checkpoint on a background thread while training goes on. At
            most one save is in flight (the next one waits for it); ``train()`` waits
            for the last one, also after an error or a preemption; a process killed
            meanwhile leaves the previous checkpoint as ``latest``. It costs one host
            copy of the state (weights, optimizer, the rest). Used on one process and
            under DDP; FSDP, DeepSpeed and Megatron save synchronously. With several
            processes a checkpoint is committed at the next save (or at the end of
            training), once every process has written its files.
        storage_timeout: seconds one request to a remote ``checkpoint_dir`` may wait
            for the server (to connect, or for the next bytes of an answer) before it
            fails; a request is tried twice. An upload that makes no progress for
            4 x ``storage_timeout`` is given up. After SIGTERM/SIGINT the run waits at
            most ``storage_timeout`` more for an upload in flight, then exits with
            ``128 + signal``, keeping the stage as a resumable checkpoint. Set in
            ``storage_options`` to override per backend; ``None`` keeps the
            filesystem's own (unbounded) defaults.

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
    async_save: bool = True
    storage_timeout: float | None = DEFAULT_STORAGE_TIMEOUT

    #: Seconds between the attempts of a failed upload (one retry per entry).
    upload_retry_delays: ClassVar[tuple[float, ...]] = (1.0, 4.0, 16.0)
    #: Seconds a remote run lock (lease) lives without renewal; renewed every quarter.
    lease_seconds: ClassVar[float] = DEFAULT_LEASE_SECONDS

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
        if self.storage_timeout is not None and not self.storage_timeout > 0:
            raise ValueError(
                f"storage_timeout must be > 0 seconds or None, got {self.storage_timeout}"
            )
        if self.checkpoint_dir is None:
            self.checkpoint_dir = os.path.join(self.project_dir, "checkpoints")
        self.checkpoint_dir = str(self.checkpoint_dir)
        self.checkpoint_store = CheckpointStore(
            self.checkpoint_dir, self.storage_options, timeout=self.storage_timeout
        )
        self.best_checkpoint: str | None = None
        self.resumed_from: str | None = None
        self._last_saved: tuple[int, int, int] | None = None
        self._last_saved_name: str | None = None
        stall = 4 * self.storage_timeout if self.storage_timeout else None
        self._uploader = BackgroundUploader(self.upload_retry_delays, stall_timeout=stall)
        self._run_lock: LocalRunLock | RemoteLease | None = None
        self._interrupting = False
        self._several_machines: bool | None = None
        self._host_buffers = HostBuffers()
        # A save whose files are being written in the background, committed at the
        # next save or at the end (several processes only): (name, stage, info).
        self._pending_save: tuple[str, str, dict[str, Any]] | None = None
        self._sync_save_reason: str | None = None
        self._reserve_buffers = False  # set when training starts with periodic async saves

    # ----------------------------------------------------------------- saving

    def save_checkpoint(self, name: str) -> bool:
        """Save the full training state as checkpoint ``name``; call on every process.

        With :attr:`async_save` the state is copied to host memory here and written and
        committed in the background (see the class docstring).

        Returns:
            True when the checkpoint was committed (or, saving asynchronously, its state
            taken), False when a mixin vetoed the save (for example after a non-finite
            loss).
        """
        if not self._ok_to_save():
            return False
        accelerator = self.accelerator
        store = self.checkpoint_store
        staged = store.staging_dir(name)
        # The save before this one first: its files written and committed, in order.
        self._commit_pending_save()
        # The upload in flight may read this very stage (``best`` again): finish it first.
        self._wait_for_uploads_on_every_process()
        if accelerator.is_local_main_process:
            store.clear_staging(name)
        accelerator.wait_for_everyone()
        step, epoch, batches = self._progress()
        info = {"step": step, "epoch": epoch, "batches_in_epoch": batches}
        if self._saves_in_background():
            self._save_in_background(name, staged, info)
        else:
            self._save_now(name, staged, info)
        self._last_saved = self._progress()
        self._last_saved_name = name
        self._after_checkpoint(name)
        return True

    def _save_now(self, name: str, staged: str, info: dict[str, Any]) -> None:
        """Write the stage on this thread with Accelerate's ``save_state``, then commit."""
        accelerator, store = self.accelerator, self.checkpoint_store
        accelerator.save_state(staged)
        with fail_together(accelerator, f"writing checkpoint {store.display(name)}"):
            if accelerator.is_main_process:
                for index, obj in enumerate(self.checkpoint_objects):
                    path = os.path.join(staged, object_state_file(index))
                    save_object_state(obj.state_dict(), path)
                stems = self._save_tensor_files(staged)
                state = {**self._state_to_save(), "tensor_files": stems}
                save_trainer_state(state, os.path.join(staged, TRAINER_STATE_FILE))
        self._check_and_commit(name, staged, info)

    def _check_and_commit(self, name: str, staged: str, info: dict[str, Any]) -> None:
        """Commit a stage every process has written: locally, or uploaded."""
        accelerator, store = self.accelerator, self.checkpoint_store
        # Only once every process has written its files (the block before ends in an
        # exchange between all of them): one per machine reads the whole stage.
        with fail_together(accelerator, f"checking checkpoint {store.display(name)}"):
            if accelerator.is_local_main_process:
                check_stage_complete(staged)
        if store.is_remote and self._stages_per_machine():
            self._upload_from_every_machine(name, staged, info)
        elif store.is_remote:
            if accelerator.is_main_process:
                # Sealed, the stage is a checkpoint of its own if the upload fails.
                store.seal(staged, info)
                progress = UploadProgress()
                self._uploader.submit(
                    lambda: store.commit(name, staged, info, callback=progress),
                    redact(store.display(name)),
                    on_failure=f"Its files are kept in {staged}, a complete checkpoint: "
                    f"resume with resume_from_checkpoint={staged}; check the URL, "
                    "credentials and storage_options.",
                    after=lambda: self._prune(newest=name),
                    progress=progress,
                )
            if not self.async_upload:  # the same upload and retries, waited for here
                self._wait_for_uploads_on_every_process()
        else:
            with fail_together(accelerator, f"committing checkpoint {store.display(name)}"):
                if accelerator.is_main_process:
                    store.commit(name, staged, info)
                    self._prune(newest=name)
        accelerator.wait_for_everyone()

    def _saves_in_background(self) -> bool:
        if not self.async_save:
            return False
        if self._sync_save_reason is None:
            self._sync_save_reason = snapshot_is_exact(self.accelerator) or ""
        return not self._sync_save_reason

    def _save_in_background(self, name: str, staged: str, info: dict[str, Any]) -> None:
        """Copy the state to host memory now; write and commit it on the writer thread.

        One process: the background job writes, checks and commits (uploads) the stage.
        Several: each writes its own files; the commit, which needs every process to
        agree, waits for the next save or the end of training, on this thread.
        """
        accelerator, store = self.accelerator, self.checkpoint_store
        main = accelerator.is_main_process
        # The main process alone asks for the trainer's state: a failure there must
        # reach the others before they train on and wait in the next collective.
        with fail_together(accelerator, f"writing checkpoint {store.display(name)}"):
            tensors = self._tensors_to_save() if main else {}
            for stem in tensors:
                tensor_file(stem)  # a bad stem fails here, as on the synchronous path
            state = {**self._state_to_save(), "tensor_files": sorted(tensors)} if main else None
            snapshot = self._snapshot(self._host_buffers, state, tensors)
        pause_for_test("snapshot", name)
        progress = UploadProgress()
        target = redact(store.display(name))

        def on_file(file: str) -> None:
            progress.call()
            pause_for_test("serialization", name)

        if accelerator.num_processes > 1:
            self._uploader.submit(
                lambda: write_snapshot(snapshot, staged, on_file),
                target,
                on_failure=f"Nothing was committed; check the free space of {staged}.",
                progress=progress,
                retry=False,
            )
            self._pending_save = (name, staged, info)
            return
        written: list[bool] = []

        def write_and_commit() -> None:
            if not written:  # a retried upload does not write the files again
                write_snapshot(snapshot, staged, on_file)
                check_stage_complete(staged)
                if store.is_remote:
                    # Sealed, the stage is a checkpoint of its own if the upload fails.
                    store.seal(staged, info)
                written.append(True)
            pause_for_test("marker", name)
            if store.is_remote:
                store.commit(name, staged, info, callback=progress)
            else:
                store.commit(name, staged, info)

        if store.is_remote:
            on_failure = (
                f"Its files are kept in {staged}, a complete checkpoint once all written "
                f"(it then holds a commit marker): resume with resume_from_checkpoint="
                f"{staged}; check the URL, credentials and storage_options."
            )
        else:
            on_failure = (
                "The checkpoints committed before it are untouched; check the free space "
                f"and permissions of {store.display()}."
            )
        self._uploader.submit(
            write_and_commit,
            target,
            on_failure=on_failure,
            after=lambda: self._prune(newest=name),
            progress=progress,
            retry=store.is_remote,
        )
        if store.is_remote and not self.async_upload:
            self._wait_for_uploads_on_every_process()

    def _snapshot(
        self,
        buffers: HostBuffers,
        state: dict[str, Any] | None,
        tensors: dict[str, dict[str, Any]],
    ) -> HostSnapshot:
        main = self.accelerator.is_main_process
        objects = [obj.state_dict() for obj in self.checkpoint_objects] if main else []
        return take_snapshot(self.accelerator, buffers, objects, state, tensor_files=tensors)

    def _reserve_host_buffers(self) -> None:
        """After the first update, when the optimizer's state exists: have the host
        buffers of the first background save allocated beside training, so that save
        costs a copy, not fresh memory (:meth:`HostBuffers.reserve`)."""
        tensors = self._tensors_to_save() if self.accelerator.is_main_process else {}
        self._host_buffers.reserve(lambda buffers: self._snapshot(buffers, None, tensors))

    def _commit_pending_save(self) -> None:
        """Commit the save whose files every process wrote in the background.

        Runs on the training thread of every process (collectives never run on the
        writer threads): each waits for its own writer, then they agree and commit.
        """
        pending, self._pending_save = self._pending_save, None
        if pending is None:
            return
        name, staged, info = pending
        with fail_together(
            self.accelerator, f"writing checkpoint {self.checkpoint_store.display(name)}"
        ):
            self._uploader.wait()
        pause_for_test("marker", name)
        self._check_and_commit(name, staged, info)

    def _save_tensor_files(self, staged: str) -> list[str]:
        """Write each entry of ``_tensors_to_save`` as ``<stem>.safetensors``; the stems."""
        stems = []
        for stem, tensors in sorted(self._tensors_to_save().items()):
            host = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
            safetensors.torch.save_file(host, os.path.join(staged, tensor_file(stem)))
            stems.append(stem)
        return stems

    def wait_for_uploads(self) -> None:
        """Block until the checkpoint upload in flight is committed (main process).

        The wait is bounded (see ``storage_timeout``) and gives way to SIGTERM/SIGINT.

        Raises:
            CheckpointUploadError: it failed after every retry, or stalled.
            TrainingInterrupted: a signal arrived and the upload did not finish within
                ``storage_timeout`` after it.
        """
        if self.accelerator.is_main_process:
            self._wait_for_upload()

    def _wait_for_upload(self) -> None:
        """Wait for the upload in flight; after a signal, at most ``storage_timeout``.

        A signal arriving meanwhile is recorded here and handed on afterwards, to the
        loop's own handler (a preemption) or Python's default.
        """
        guard = PreemptionGuard()
        grace = self.storage_timeout or DEFAULT_STORAGE_TIMEOUT
        signalled_at: list[float] = []

        def give_up() -> str | None:
            signum = self._pending_signal(guard)
            if signum is None:
                return None
            if not signalled_at:
                signalled_at.append(time.monotonic())
            if time.monotonic() - signalled_at[0] < grace:
                return None
            return f"interrupted by {signal.Signals(signum).name}, it got {grace:g} s more"

        with guard:
            try:
                self._uploader.wait(give_up)
            except CheckpointUploadError as err:
                signum = self._pending_signal(guard)
                if signum is None:
                    raise
                message = f"accel_hydra: interrupted by {signal.Signals(signum).name}; {err}"
                print(message, file=sys.stderr, flush=True)
                raise TrainingInterrupted(signum, message) from err
        if guard.signal_number is not None:
            signal.raise_signal(guard.signal_number)

    def _pending_signal(self, guard: PreemptionGuard) -> int | None:
        """The signal that asks the run to stop: seen during this wait, or the one
        being handled (a preemption save), or None."""
        if guard.signal_number is not None:
            return guard.signal_number
        if not self._interrupting:
            return None
        # The loop knows which signal started the preemption save.
        return self.interrupt_signal or signal.SIGTERM

    def _wait_for_uploads_on_every_process(self) -> None:
        """Like :meth:`wait_for_uploads`, but a failure stops every process, not only
        the main one that ran the upload (the others would wait for it forever): a
        failed upload as :class:`CheckpointUploadError`, a signal during the wait as
        :class:`TrainingInterrupted`, a failed pruning after it as
        :class:`~accel_hydra.distributed.DistributedStepError`."""
        error: BaseException | None = None
        outcome: tuple[str, int, str] | None = None
        if self.accelerator.is_main_process:
            try:
                self._wait_for_upload()
            except TrainingInterrupted as err:
                error, outcome = err, ("interrupt", err.signal_number, err.message)
            except CheckpointUploadError as err:
                error, outcome = err, ("upload", 0, str(err))
            except Exception as err:
                if self.accelerator.num_processes == 1:
                    raise
                error, outcome = err, ("other", 0, f"{type(err).__name__}: {err}")
        if self.accelerator.num_processes > 1:
            outcome = broadcast_object_list([outcome])[0]
        if error is not None and (outcome is None or outcome[0] != "other"):
            raise error
        if outcome is not None:
            kind, signum, message = outcome
            if kind == "interrupt":
                raise TrainingInterrupted(signum, message)
            if kind == "upload":
                raise CheckpointUploadError(message)
            raise DistributedStepError(
                f"the checkpoint upload in flight failed on process 0 with {message}; "
                "every process stopped here"
            ) from error

    def _stages_per_machine(self) -> bool:
        """Whether processes run on several machines, each staging on its own disk.

        Counted from Accelerate's own view (how many processes are the first on their
        machine), not from a launcher's environment variables, which not every
        launcher sets. Asked once, on every process at the same save.
        """
        if self._several_machines is None:
            accelerator = self.accelerator
            firsts = [accelerator.is_local_main_process]
            if accelerator.num_processes > 1:
                firsts = gather_object(firsts)
            self._several_machines = sum(firsts) > 1
        return self._several_machines

    def _upload_from_every_machine(self, name: str, staged: str, info: dict) -> None:
        """Each machine uploads what its processes staged; then the marker, once.

        Synchronous: the marker must list every machine's files, which needs all of
        them to meet after their uploads.
        """
        accelerator, store = self.accelerator, self.checkpoint_store
        target = store.display(name)
        # Every step that runs on some processes only ends in an exchange of errors,
        # so a failure anywhere stops every machine instead of leaving them waiting.
        with fail_together(accelerator, f"clearing {target} for its upload"):
            if accelerator.is_main_process:
                store.clear_target(name)
        uploaded: dict[str, dict[str, Any]] = {}
        with fail_together(accelerator, f"uploading checkpoint {target}"):
            if accelerator.is_local_main_process:
                uploaded = store.upload(name, staged)
        parts = gather_object([uploaded])
        with fail_together(accelerator, f"committing checkpoint {target}"):
            if accelerator.is_main_process:
                files = {}
                for part in parts:
                    files.update(part)
                store.write_marker(name, info, files)
                self._prune(newest=name)
        if accelerator.is_local_main_process:
            shutil.rmtree(staged, ignore_errors=True)

    def _progress(self) -> tuple[int, int, int]:
        progress = self.progress
        return (progress.step, progress.epoch, progress.batch)

    def _prune(self, newest: str) -> None:
        protected = {self.resumed_from} if self.resumed_from else set()
        committed = self.checkpoint_store.committed()
        for name in checkpoints_to_prune(committed, self.save_last_k, protected, newest):
            try:
                self.checkpoint_store.delete(name)
            except Exception as err:
                raise RuntimeError(
                    f"pruning old checkpoint {self.checkpoint_store.display(name)} failed "
                    f"({type(err).__name__}: {err}); {newest} itself is committed. Check "
                    f"the permissions of {self.checkpoint_store.display()}, or set "
                    "save_last_k=None to keep every checkpoint"
                ) from err

    def _on_interrupt(self) -> str | None:
        super()._on_interrupt()
        # From here on, waits for an upload are bounded by the grace period.
        self._interrupting = True
        if self._last_saved != self._progress():
            name = f"step_{self.step}"
            if not self.save_checkpoint(name):
                return None
        elif self._last_saved_name is None:  # resumed and interrupted before any update
            return self.resumed_from and self.checkpoint_store.display(self.resumed_from)
        # The grace period before SIGKILL is short: the checkpoint must be stored now.
        self._commit_pending_save()
        self._wait_for_uploads_on_every_process()
        return self.checkpoint_store.display(self._last_saved_name)

    def _before_training(self) -> None:
        super()._before_training()
        periodic = (
            self.save_every_n_steps or self.save_every_n_epochs or self.permanent_save_every_n_steps
        )
        self._reserve_buffers = bool(periodic) and self._saves_in_background()

    def _after_update(self) -> None:
        super()._after_update()
        if self._reserve_buffers:
            self._reserve_buffers = False
            self._reserve_host_buffers()
        step = self.progress.step
        if self.save_every_n_steps and step % self.save_every_n_steps == 0:
            self.save_checkpoint(f"step_{step}")
        if self.permanent_save_every_n_steps and step % self.permanent_save_every_n_steps == 0:
            self.save_checkpoint(f"permanent_step_{step}")

    def _epoch_end_checkpoint(self, metrics: dict[str, Any]) -> None:
        super()._epoch_end_checkpoint(metrics)
        every = self.save_every_n_epochs
        if every and (self.epoch % every == 0 or self.epoch == self.epochs):
            self.save_checkpoint(f"epoch_{self.epoch}")
        if self.metric_improved and self.save_checkpoint("best"):
            self.best_checkpoint = self.checkpoint_store.display("best")

    # ----------------------------------------------------------------- resuming

    def _writable_dirs(self) -> list[tuple[str, str | None, dict | None]]:
        mine = ("checkpoint_dir", self.checkpoint_dir, self.storage_options)
        return [*super()._writable_dirs(), mine]

    def _after_prepare(self) -> None:
        self._interrupting = False
        # The lock comes before the other mixins' set-up: a run refused at start must
        # leave no trace (log files, stages) beside the run that holds the directory.
        try:
            self._take_checkpoint_dir()
            super()._after_prepare()
        except BaseException:
            self._release_run_lock()
            raise
        for index, obj in enumerate(self.checkpoint_objects):
            if not (
                callable(getattr(obj, "state_dict", None))
                and callable(getattr(obj, "load_state_dict", None))
            ):
                raise TypeError(
                    f"checkpoint_objects[{index}] ({type(obj).__name__}) has no "
                    "state_dict()/load_state_dict(); only such objects can be checkpointed"
                )

    def _take_checkpoint_dir(self) -> None:
        """Check the store, take its run lock, then finish interrupted saves.

        Only the main process touches the store; the others learn the outcome (and the
        run id that names this run's stages) from it, so every process fails alike.
        """
        accelerator, store = self.accelerator, self.checkpoint_store
        outcome: tuple[str | None, str | None] = (None, None)
        if accelerator.is_main_process:
            new_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
            try:
                store.check_bucket()
                if store.is_local:
                    self._run_lock = LocalRunLock(store.root, new_id)
                else:
                    where = redact(store.display())
                    self._run_lock = RemoteLease(
                        store.fs, store.root, where, new_id, self.lease_seconds
                    )
                notice = self._run_lock.acquire()
                if notice:
                    print(notice, file=sys.stderr, flush=True)
                # Only with the lock held: every stage left is then a dead run's.
                store.recover()
                outcome = (new_id, None)
            except Exception as err:
                self._run_lock = None
                outcome = (None, str(err))
                if accelerator.num_processes == 1:
                    raise
                error = err
        if accelerator.num_processes > 1:
            outcome = broadcast_object_list([outcome])[0]
        run_id, message = outcome
        if message is not None:
            if accelerator.is_main_process:
                raise error
            raise RuntimeError(message)
        store.run_id = run_id

    def _release_run_lock(self) -> None:
        lock, self._run_lock = self._run_lock, None
        if lock is not None:
            lock.release()
        store = self.checkpoint_store
        if store.is_remote and store.run_id and self.accelerator.is_local_main_process:
            # This run's stage directory, unless a failed upload kept a stage in it.
            with contextlib.suppress(OSError):
                os.rmdir(store.staging_root)

    def _restore(self) -> None:
        try:
            super()._restore()
            target = self.resume_from_checkpoint
            if not target:
                return
            if target == "latest":
                self._restore_latest()
            else:
                store, name = self._resolve_resume_target(target)
                if name is not None:  # None only for "latest", handled above
                    self._restore_from(store, name)
        except BaseException:
            # train() calls _after_train only once training began: let go here.
            self._release_run_lock()
            raise

    def _restore_latest(self) -> None:
        """Resume from the newest committed checkpoint that loads, skipping damaged ones."""
        store = self.checkpoint_store
        committed, damaged = store.scan()
        for name, reason in sorted(damaged.items()):
            self._set_aside(name, reason)
        if not committed:
            self._say(f"accel_hydra: no committed checkpoint in {store.display()}: starting fresh")
            return
        newest_first = sorted(
            committed, key=lambda name: checkpoint_order(name, committed[name]), reverse=True
        )
        reasons = [*damaged.values()]
        for name in newest_first:
            try:
                self._restore_from(store, name)
                return
            except CheckpointCorruptError as err:
                reasons.append(str(err))
                if err.damaged:
                    self._set_aside(name, str(err))
                else:
                    self._say(f"accel_hydra: skipping {name}: {err}")
                    self.accelerator.wait_for_everyone()
        raise CheckpointCorruptError(
            f"no checkpoint in {store.display()} could be loaded: " + "; ".join(reasons)
        )

    def _set_aside(self, name: str, reason: str) -> None:
        """Say why damaged checkpoint ``name`` is skipped, and quarantine it (main process)."""
        store = self.checkpoint_store
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            try:
                hidden = store.quarantine(name)
            except Exception as err:  # a read-only store: skipped now, named again next time
                where = f"could not move it aside ({type(err).__name__}: {err})"
            else:
                where = (
                    f"moved it aside to {store.display(hidden)}"
                    if hidden != name
                    else "removed its marker; its files stay, uncommitted"
                )
            self._say(f"accel_hydra: skipping {name}: {reason}; {where}")
        self.accelerator.wait_for_everyone()

    def _after_train(self) -> None:
        try:
            if sys.exc_info()[0] is None:
                # After an error the processes may not meet again: an uncommitted
                # save stays a stage, cleared at the next start.
                self._commit_pending_save()
            self.wait_for_uploads()
        finally:
            try:
                self._release_run_lock()
            finally:
                super()._after_train()

    def _restore_from(self, store: CheckpointStore, name: str) -> None:
        """Resume from checkpoint ``name``: its checksums are computed while its files
        are parsed, and nothing is loaded into the run until every one matched."""
        label = store.display(name)
        local = self._fetch_verified(store, name, verify=False)
        with ThreadPoolExecutor(1, thread_name_prefix="accel_hydra verify") as pool:
            verifying = None
            if self.accelerator.is_local_main_process:  # its machine's processes share it
                verifying = pool.submit(store.verify_fetched, name, local)
            reading: _Reading | None = None
            failure: BaseException | None = None
            try:
                reading = self._read_checkpoint(local, label)
            except Exception as err:
                failure = err
            if verifying is not None and verifying.exception() is not None:
                failure = verifying.exception()  # damage explains a parse error too
        self._agree_on_failure(failure)
        assert reading is not None
        self._apply_checkpoint(local, label, reading)
        if store.url == self.checkpoint_store.url:
            self.resumed_from = name
        self._last_saved = self._progress()
        self._say(
            f"accel_hydra: resumed from {store.display(name)} "
            f"(epoch {self.epoch}, step {self.step}, batch {self.progress.batch})"
        )

    def _fetch_verified(self, store: CheckpointStore, name: str, verify: bool = True) -> str:
        """Fetch and verify checkpoint ``name`` once per machine; every process agrees.

        One process per machine downloads (remote) and checks every file's checksum
        (unless ``verify`` is False: the caller does it); its machine's other
        processes read the same directory. A failure anywhere is raised on every
        process, so they all skip the same checkpoint together.
        """
        failure = None
        try:
            local = store.fetch(
                name, download=self.accelerator.is_local_main_process, verify=verify
            )
        except (CheckpointNotFoundError, CheckpointCorruptError) as err:
            failure = err
        self._agree_on_failure(failure)
        return local

    def _agree_on_failure(self, failure: BaseException | None) -> None:
        """Raise the same error on every process if any process had one.

        Processes that go on must all go on: one that raised alone would leave the
        others waiting in a collective. A damaged checkpoint's error wins over the
        rest, so every process sets the same checkpoint aside; the process that had
        the error raises its own, the others one of the same kind and message.
        """
        accelerator = self.accelerator
        if accelerator.num_processes == 1:
            if failure is not None:
                raise failure
            return
        mine = None if failure is None else _describe_failure(failure)
        failures = [f for f in gather_object([mine]) if f is not None]
        accelerator.wait_for_everyone()
        if not failures:
            return
        chosen = next((f for f in failures if f[2]), failures[0])
        if failure is not None and mine == chosen:
            raise failure
        raise _failure_like(chosen) from failure

    def _resolve_resume_target(self, target: str) -> tuple[CheckpointStore, str | None]:
        if target == "latest":
            store = self.checkpoint_store
            return store, store.latest()
        if "/" not in target and os.sep not in target:
            return self.checkpoint_store, target
        parent, _, name = target.rstrip("/").rpartition("/")
        return CheckpointStore(parent or ".", self.storage_options, self.storage_timeout), name

    # --------------------------------------------------------------- evaluating

    def _load_checkpoint_weights(self, checkpoint: str) -> None:
        """Load only the model weights of ``checkpoint`` (for ``validate``/``predict``).

        The checkpoint is resolved like ``resume_from_checkpoint`` (a name, ``latest``,
        a path or URL), fetched and verified against its marker's checksums like a
        resume, and its weights file read without running code (safetensors, or
        ``torch.load(weights_only=True)``). Optimizer, RNG, progress and the run's
        own state stay as they are; nothing is written to the store.
        """
        store, name = self._resolve_resume_target(checkpoint)
        if name is None:  # "latest" in an empty store
            raise CheckpointNotFoundError(
                f"checkpoint 'latest': no committed checkpoint in {redact(store.display())}; "
                "train first, or give a checkpoint path or URL"
            )
        label = redact(store.display(name))
        try:
            local = self._fetch_verified(store, name)
        except CheckpointNotFoundError:
            raise CheckpointNotFoundError(
                f"checkpoint {label} does not exist or was never committed; committed in "
                f"{redact(store.display())}: {_committed_names(store)}. Give one of those, "
                "'latest', or a path or URL to a checkpoint directory"
            ) from None
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        state = _read_model_weights(local, label)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            mismatch = describe_mismatch(err) or f"{type(err).__name__}: {err}"
            raise CheckpointMismatchError(
                f"checkpoint {label} does not fit this model: {mismatch}; build the model "
                "with the settings of the run that saved it"
            ) from None

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
        self._apply_checkpoint(local_dir, label, self._read_checkpoint(local_dir, label))

    def _read_checkpoint(self, local_dir: str, label: str) -> _Reading:
        """Parse what can be parsed of a checkpoint without changing the run.

        The trainer state is read and checked against this run's setup, and, where
        the loop reads Accelerate's layout itself, every pickle-capable file is
        loaded once with the safe unpickler (the load is its code check). Elsewhere
        each is only checked, and ``load_state`` loads it later.
        """
        state = self._read_trainer_state(local_dir, label)
        # A checkpoint of another setup fails here in one line, before any state changes.
        self._check_resumable(state, label)
        accelerator = self.accelerator
        # A GPU process holding its state whole loads it straight onto its device, not
        # through host memory first (Accelerate does so already for several GPUs).
        on_gpu = accelerator.device.type == "cuda" and snapshot_is_exact(accelerator) is None
        read = None
        if reads_exactly(accelerator, local_dir) is None:
            try:
                read = read_checkpoint(accelerator, local_dir, on_device=on_gpu)
            except UnsafeCheckpointError as err:
                raise CheckpointCorruptError(
                    f"checkpoint {label} is refused: {err}", damaged=True
                ) from err
            except Exception as err:
                raise CheckpointCorruptError(
                    f"checkpoint {label} could not be loaded: {type(err).__name__}: {err}"
                ) from err
        self._refuse_code(local_dir, label, read.files if read is not None else set())
        return _Reading(state=state, read=read, on_gpu=on_gpu)

    def _apply_checkpoint(self, local_dir: str, label: str, reading: _Reading) -> None:
        """Load a parsed checkpoint into the run: weights, optimizer, RNG, the rest."""
        accelerator = self.accelerator
        where = {"map_location": "on_device"} if reading.on_gpu else {}
        state = reading.state
        try:
            if reading.read is not None:
                apply_checkpoint(accelerator, reading.read)
            else:
                accelerator.load_state(local_dir, **where)
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
        self._load_checkpoint_objects(local_dir, label)
        self._load_state(state)
        self._load_tensors(self._read_tensor_files(local_dir, label, state))

    def _read_trainer_state(self, local_dir: str, label: str) -> dict[str, Any]:
        """The checkpoint's trainer state (JSON; a legacy ``.pt`` one safely)."""
        state_file = os.path.join(local_dir, TRAINER_STATE_FILE)
        if not os.path.exists(state_file):
            state_file = os.path.join(local_dir, _LEGACY_TRAINER_STATE_FILE)
        if not os.path.exists(state_file):
            raise FileNotFoundError(
                f"{label} is not an accel_hydra checkpoint: {TRAINER_STATE_FILE} is missing"
            )
        try:
            return load_trainer_state(state_file)
        except (ValueError, UnsafeCheckpointError) as err:
            raise CheckpointCorruptError(
                f"checkpoint {label} is damaged: {err}", damaged=True
            ) from err

    def _refuse_code(self, local_dir: str, label: str, read: set[str]) -> None:
        """Check every pickle-capable file loads without running code, before any loads.

        ``read`` names the files already loaded with the safe unpickler.
        """
        own = {_LEGACY_TRAINER_STATE_FILE}
        own.update(object_state_file(i) for i in range(len(self.checkpoint_objects)))
        for path in pickle_capable_files(local_dir):
            if os.path.basename(path) in own or os.path.relpath(path, local_dir) in read:
                continue  # read by the safe loader itself, with a better message
            try:
                check_code_free(path)
            except UnsafeCheckpointError as err:
                raise CheckpointCorruptError(
                    f"checkpoint {label} is refused: {err}",
                    damaged=True,
                ) from err

    def _load_checkpoint_objects(self, local_dir: str, label: str) -> None:
        for index, obj in enumerate(self.checkpoint_objects):
            owner = f"checkpoint_objects[{index}] ({type(obj).__name__})"
            path = os.path.join(local_dir, object_state_file(index))
            if not os.path.exists(path):
                raise CheckpointCorruptError(
                    f"checkpoint {label} holds no state for {owner}: it was saved with fewer "
                    "checkpoint_objects; resume with the same ones, or start fresh"
                )
            obj.load_state_dict(load_object_state(path, owner))

    def _read_tensor_files(
        self, local_dir: str, label: str, state: dict[str, Any]
    ) -> dict[str, dict[str, Any]]:
        """The extra tensor files the checkpoint lists, read with safetensors (no code)."""
        stems = state.get("tensor_files", [])
        if not isinstance(stems, list) or not all(isinstance(s, str) for s in stems):
            raise CheckpointCorruptError(
                f"checkpoint {label} is damaged: tensor_files is not a list of names",
                damaged=True,
            )
        files = {}
        for stem in stems:
            try:
                path = os.path.join(local_dir, tensor_file(stem))
                files[stem] = safetensors.torch.load_file(path, device="cpu")
            except Exception as err:  # a bad stem, a missing or unreadable file
                raise CheckpointCorruptError(
                    f"checkpoint {label} is damaged: its tensor file {stem!r} cannot be read "
                    f"({type(err).__name__}: {err})",
                    damaged=True,
                ) from err
        return files

    def _state_to_save(self) -> dict[str, Any]:
        state = super()._state_to_save()
        # A name inside checkpoint_dir, never a path or URL: a moved run stays right,
        # and no credential in the URL is written into the checkpoint.
        state["best_checkpoint_name"] = "best" if self.best_checkpoint else None
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        saved = state.get("best_checkpoint_name") or state.get("best_checkpoint")
        # Older checkpoints stored a full path; only that it existed matters: the name is
        # always "best", under this run's checkpoint_dir (wherever the run now lives).
        self.best_checkpoint = self.checkpoint_store.display("best") if saved else None

    def _summary_lines(self) -> list[tuple[str, str]]:
        lines = super()._summary_lines()
        store = self.checkpoint_store
        where = redact(store.display())
        if store.is_remote:
            where += f" (staged in {store.staging_root}, "
            where += "uploaded in the background)" if self.async_upload else "uploaded)"
        lines.append(("checkpoints", where))
        if self._saves_in_background():
            lines.append(("checkpoint saves", "in the background (one host copy of the state)"))
        else:
            reason = self._sync_save_reason or "async_save=False"
            lines.append(("checkpoint saves", f"synchronous ({reason})"))
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


@dataclass
class _Reading:
    """A checkpoint parsed by :meth:`CheckpointMixin._read_checkpoint`, not yet loaded."""

    state: dict[str, Any]
    read: ReadCheckpoint | None  # None: accelerator.load_state reads Accelerate's files
    on_gpu: bool


_FAILURE_KINDS: dict[str, type[BaseException]] = {
    kind.__name__: kind
    for kind in (
        CheckpointCorruptError,
        CheckpointNotFoundError,
        CheckpointMismatchError,
        FileNotFoundError,
        ValueError,
    )
}


def _describe_failure(failure: BaseException) -> tuple[str, str, bool]:
    """What another process needs to raise the same error: kind, message, damaged."""
    kind = type(failure).__name__ if type(failure).__name__ in _FAILURE_KINDS else "RuntimeError"
    return kind, str(failure), bool(getattr(failure, "damaged", False))


def _failure_like(described: tuple[str, str, bool]) -> BaseException:
    kind, message, damaged = described
    if kind == CheckpointCorruptError.__name__:
        return CheckpointCorruptError(message, damaged=damaged)
    return _FAILURE_KINDS.get(kind, RuntimeError)(message)


def _committed_names(store: CheckpointStore) -> str:
    """The committed checkpoints of ``store``, most training progress last."""
    try:
        committed = store.committed()
    except Exception as err:  # the listing is a hint: its failure must not hide the error
        return f"(could not list: {type(err).__name__})"
    names = sorted(committed, key=lambda name: checkpoint_order(name, committed[name]))
    return ", ".join(names) or "none"


def _read_model_weights(local_dir: str, label: str) -> dict[str, Any]:
    """The model's state dict from a verified checkpoint directory, read code-free."""
    for filename in WEIGHT_FILES:
        path = os.path.join(local_dir, filename)
        if not os.path.exists(path):
            continue
        try:
            return read_weights_file(path)
        except Exception as err:
            raise CheckpointCorruptError(
                f"checkpoint {label}: cannot read {filename} ({type(err).__name__}: {err})"
            ) from None
    raise CheckpointCorruptError(
        f"checkpoint {label} holds no {' or '.join(WEIGHT_FILES)} (a sharded FSDP or "
        "DeepSpeed state?); only checkpoints with a full weights file can be evaluated"
    )
