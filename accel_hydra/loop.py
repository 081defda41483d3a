"""LoopBase: the training loop, its user hooks and its internal extension points.

Nothing optional lives here: checkpoints, early stopping, LR schedules, logging and
gradient clipping are mixins (``accel_hydra.mixins``) that plug into the extension
points below. The order of work is fixed by :meth:`LoopBase.train` and documented in
``docs/trainer.rst``; keep the three in step.

The mixin protocol. This module's two tables and the public attributes of
:class:`LoopBase` are the whole contract between the loop and the mixins: a mixin
overrides the extension points, calls the services, reads and sets the public
attributes, and touches no other private name that it does not define itself
(``tests/test_mixin_protocol.py`` checks that). What one capability needs from another
becomes a public attribute of the loop (``last_grad_norm``, ``samples_per_second``).

Extension points for mixin authors (each a no-op here; override, call ``super()``
first, then add your work, so any subset of mixins composes in any order). The
per-batch ones (``_update_is_safe`` to ``_after_update``, see
``accel_hydra.extension_points``) are looked up once at the start of ``train()``: the
loop calls only those the composed class overrides, so an unused one costs nothing:

===============================  =======================================================
``_accelerator_kwargs()``        keyword arguments for ``Accelerator`` (returns a dict)
``_after_prepare()``             objects are prepared: build schedulers, open writers
``_writable_dirs()``             ``(setting, url, storage_options)`` probed before training
``_restore()``                   after ``_after_prepare``: load a checkpoint to resume
``_check_sanity_metrics(m)``     the sanity validation's metrics: check what you read
``_before_training()``           restored and checked, before the first batch: open writers
``_is_logging_step()``           whether this update logs (the loss is read on it)
``_before_optimizer_step()``     gradients of an update are complete: clip them
``_after_optimizer_step()``      an update happened (``self.step`` counts it): LR step
``_after_update()``              after the LR step: log, save step checkpoints
``_read_loss()``                 the one place the loss is moved to the host
``_after_validation(metrics)``   validation metrics are known and agreed on all ranks
``_validation_context()``        a context around every validation pass (the sanity
                                 one too): swap other weights in, and back after
``_epoch_end_schedule(metrics)`` epoch-based LR step
``_epoch_end_checkpoint(...)``   epoch and best checkpoints
``_epoch_end_stop_check(...)``   early stopping
``_ok_to_save()``                veto a save (for example after a non-finite loss)
``_update_is_safe()``            veto an optimizer update before it happens
``_on_interrupt()``              a preemption signal arrived: save, return where
``_after_checkpoint(name)``      a checkpoint was saved: sync what goes with it (logs)
``_state_to_save()``             the trainer's own state, merged into each checkpoint
``_load_state(state)``           the inverse, on resume
``_tensors_to_save()``           extra tensor files per checkpoint: ``{stem: {name: t}}``,
                                 each written as ``<stem>.safetensors``
``_load_tensors(files)``         the inverse, after ``_load_state``, with every saved stem
``_check_resumable(state, ...)`` before a checkpoint loads: refuse one of another setup
``_after_train()``               training ended (normally or not): flush, close
``_load_checkpoint_weights(c)``  evaluation: load checkpoint ``c``'s model weights
``_summary_lines()``             ``(label, value)`` rows of the start summary
``_end_summary_lines()``         rows of the end summary
===============================  =======================================================

Services the loop offers to mixins (call them; do not override):

===================================  ===================================================
``_say(message)``                    print a status line on the main process, flushed
``_optimizer_step_was_skipped()``    whether mixed precision skipped the last update
``_last_read_losses()``              the batch losses the last loss read averaged, in
                                     order, on the device (read them right away)
===================================  ===================================================

Public attributes mixins read (see :class:`LoopBase`): ``progress``, ``accelerator``,
``pending_loss_sum``, ``pending_loss_count``, ``last_loss``, ``last_grad_norm``,
``samples_per_second``, ``single_process``, ``direct_updates``, ``updates_per_epoch``,
``val_metrics``, ``should_stop_training``, ``interrupt_signal``.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, cast

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, broadcast_object_list, set_seed

from accel_hydra.compat import UPSTREAM_TRAINER_METHODS, ProjectDir, check_upstream_methods
from accel_hydra.compiling import check_toolchain, compile_options
from accel_hydra.console import EpochProgress, format_duration, format_summary
from accel_hydra.direct_updates import direct_updates_are_exact
from accel_hydra.distributed import (
    fail_together,
    launched_without_gpus,
    leave_process_group_at_exit,
    note_exit_status,
    process_group_exists,
)
from accel_hydra.epoch_order import use_block_order
from accel_hydra.evaluation import concatenate_outputs, outputs_to_cpu, prepare_eval_loader
from accel_hydra.extension_points import PER_BATCH_POINTS, overridden_points
from accel_hydra.init_weights import apply_init_from
from accel_hydra.model_summary import module_table
from accel_hydra.pending_losses import FOLD_EVERY, PendingLosses
from accel_hydra.preemption import InterruptAgreement, PreemptionGuard, TrainingInterrupted
from accel_hydra.preflight import PreflightError, check_writable
from accel_hydra.progress import Progress
from accel_hydra.rng import capture_rng_state, restore_rng_state

__all__ = ["LoopBase"]

#: A callable that builds the optimizer from the model's parameters (a Hydra
#: ``_partial_`` such as ``torch.optim.AdamW`` with ``lr`` bound).
OptimizerFactory = Callable[[Iterator[torch.nn.Parameter]], torch.optim.Optimizer]

#: What ``next`` returns when a dataloader without ``len()`` runs out inside an epoch.
_EXHAUSTED = object()


@dataclass(kw_only=True, eq=False)
class LoopBase(ABC):
    """The core training loop, run on whatever hardware ``accelerate`` was launched with.

    Subclass it (or :class:`accel_hydra.Trainer`) and implement :meth:`training_step`
    and :meth:`validation_step`.

    Args:
        model: the ``torch.nn.Module`` to train.
        optimizer: a ``torch.optim.Optimizer`` over ``model``'s parameters, or a callable
            taking the parameters and returning one (a Hydra ``_partial_``).
        train_dataloader: the training ``DataLoader``.
        val_dataloader: the validation ``DataLoader``; no validation when ``None``.
        loss_fn: optional loss module, for use in your own ``training_step``.
        epochs: how many epochs to train.
        epoch_length: batches per epoch (per process); default: the whole dataloader.
        gradient_accumulation_steps: batches whose gradients make one optimizer update.
        project_dir: the run directory; checkpoints and logs go below it by default.
            Kept as a ``str`` that also works as a ``pathlib.Path`` (``project_dir / "x"``).
        config_dict: the run's configuration, stored with logs for reference.
        accelerator_kwargs: extra keyword arguments for ``accelerate.Accelerator``
            (``mixed_precision="bf16"``, ``cpu=True``...).
        even_batches: whether every process sees the same number of batches
            (Accelerate pads the last ones); ``False`` lets the last batches differ.
        progress_bar: draw a progress bar on the main process (on a terminal; when
            standard error is not one, a plain line per epoch and every
            ``progress_interval`` seconds instead).
        sanity_val_batches: before the first training batch, validate on this many
            batches and check the monitored metric is among ``get_val_metrics()``, so a
            wrong ``metric_name`` fails in seconds, not after an epoch; ``0`` skips it.
            It changes nothing the run depends on: random states are put back after it,
            and ``on_validation_start`` resets your accumulators before the real pass.
        init_from: a checkpoint (this package's, a plain Accelerate ``save_state``
            directory, or a weights file; path or URL) whose model weights are loaded
            after ``prepare``; training then starts fresh (see ``accel_hydra.init_weights``).
        init_strict: refuse weights that do not fit the model exactly; ``False`` loads
            the tensors that fit and lists the others once.
        compile: ``True`` compiles the prepared model with ``torch.compile`` (after
            ``init_from``); a dict passes its options (``{"backend": "aot_eager"}``,
            ``{"mode": "max-autotune"}``). ``self.model`` is then the compiled module;
            checkpoints hold the plain model's weights (no ``_orig_mod.`` prefix), so
            compiled and uncompiled runs resume each other. A machine that cannot
            build inductor's kernels fails in one line before training.
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"``, given to ``Accelerator``;
            ``None`` (default) leaves it to Accelerate (``accelerate config`` or
            ``accelerate launch --mixed_precision``). The start summary shows the one used.
        model_summary: print a table of the model's top-level modules with their
            trainable and frozen parameter counts in the start summary.

    Attributes:
        accelerator: the ``Accelerator``, once :meth:`setup_accelerator` ran.
        progress: where training stands (:class:`~accel_hydra.progress.Progress`:
            epoch, update step, batch position and total of the epoch, accumulation
            phase), saved and restored as one piece.
        step: optimizer updates done so far (global; one per accumulation cycle);
            the same as ``progress.step``.
        epoch: epochs completed so far; the same as ``progress.epoch``.
        should_stop_training: set to ``True`` to stop; checked after every batch. Set
            during the batches, it skips the rest of the epoch and its validation.
        val_metrics: the metrics of the last validation, agreed on every process.
        last_loss: the mean loss over the batches since the last read (read on
            logging steps, before checkpoints and at epoch end only).
        pending_loss_sum: the sum, on the device, of the losses since the last read;
            a mixin may inspect it (``torch.isfinite``) without moving it to the host.
            Computed when read (a few tensor ops): the loop itself keeps the losses
            without a tensor op per batch (:mod:`accel_hydra.pending_losses`).
        pending_loss_count: how many batch losses ``pending_loss_sum`` holds.
        last_grad_norm: the total gradient norm of the last update as a tensor, when
            a mixin computed one (:class:`~accel_hydra.GradClipMixin`); else ``None``.
        samples_per_second: training throughput between the last two loss reads, or
            ``None`` before the second read.
        single_process: whether the run has one process (set up by
            :meth:`setup_accelerator`); several processes must agree on decisions.
        direct_updates: whether the loop calls torch directly instead of Accelerate's
            per-step wrappers (see ``accel_hydra.direct_updates``).
        updates_per_epoch: optimizer updates in a full epoch.
    """

    #: Whether the loop may call torch directly where Accelerate's per-step wrappers
    #: provably change nothing (see ``accel_hydra.direct_updates``); set ``False`` in a
    #: subclass to always go through Accelerate.
    _allow_direct_updates: ClassVar[bool] = True
    #: Whether the train loader's shuffling sampler is swapped for one that yields the
    #: same order without a Python frame per sample (see ``accel_hydra.epoch_order``);
    #: set ``False`` in a subclass to keep Accelerate's ``SeedableRandomSampler``.
    _block_epoch_order: ClassVar[bool] = True

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | OptimizerFactory
    train_dataloader: Iterable
    val_dataloader: Iterable | None = None
    loss_fn: Callable | None = None
    epochs: int
    epoch_length: int | None = None
    gradient_accumulation_steps: int = 1
    project_dir: str | os.PathLike
    config_dict: dict | None = None
    accelerator_kwargs: dict = field(default_factory=dict)
    even_batches: bool = True
    progress_bar: bool = True
    sanity_val_batches: int = 2
    init_from: str | None = None
    init_strict: bool = True
    compile: bool | dict = False
    mixed_precision: Literal["no", "bf16", "fp16"] | None = None
    model_summary: bool = True

    #: Seconds between plain progress lines when standard error is not a terminal.
    progress_interval: ClassVar[float] = 60.0

    def __post_init__(self) -> None:
        if self.sanity_val_batches < 0:
            raise ValueError(
                f"sanity_val_batches must be >= 0 (0 skips it), got {self.sanity_val_batches}"
            )
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(
                f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}"
            )
        if self.epoch_length is not None and self.epoch_length < 1:
            raise ValueError(f"epoch_length must be >= 1 or None, got {self.epoch_length}")
        self._check_mixed_precision()
        self.project_dir = ProjectDir(self.project_dir)
        self._compile_options = compile_options(self.compile)
        check_upstream_methods(self, UPSTREAM_TRAINER_METHODS, LoopBase)
        # Set by setup_accelerator(); None until then.
        self.accelerator: Accelerator = cast(Accelerator, None)
        self.progress = Progress()
        self.should_stop_training = False
        self.val_metrics: dict[str, Any] = {}
        self.last_loss: float | None = None
        self.last_grad_norm: torch.Tensor | None = None
        self.updates_per_epoch = 0
        self._pending_losses = PendingLosses("cpu")
        self.pending_loss_count = 0
        self.samples_per_second: float | None = None
        self.single_process = True
        self.direct_updates = False
        self._truncated_epoch = False
        self._ends_with_loader = False
        self._throughput_mark = (0.0, 0)
        # Training time only (batches, not validation or checkpoints): throughput is
        # samples over this clock, so a slow validation does not halve samples/s.
        self._train_seconds = 0.0
        self._train_clock_since: float | None = None
        self._run_clock: tuple[float, int] | None = None
        #: Called once the run has really started (restored, checked): the launcher
        #: saves config.yaml here, so a run that failed to start leaves no trace.
        self._run_start_actions: list[Callable[[], None]] = []
        #: How to continue after an interruption, for the message; the launcher sets
        #: the command line that resumes.
        self.resume_advice = (
            'build the trainer again with resume_from_checkpoint="latest" and call train()'
        )
        self._rng_after_restore: dict[str, Any] | None = None
        self._preemption = PreemptionGuard()
        self._interrupt_agreement = InterruptAgreement()
        self._stepped_optimizer: Any = None
        self._train_called = False
        # The val loader as given, while an evaluation before train() holds it prepared.
        self._unprepared_val_dataloader: Iterable | None = None

    def _check_mixed_precision(self) -> None:
        if self.mixed_precision is None:
            return
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(
                f"mixed_precision must be 'no', 'bf16', 'fp16' or None (Accelerate's "
                f"setting), got {self.mixed_precision!r}"
            )
        other = self.accelerator_kwargs.get("mixed_precision")
        if other is not None and str(other) != self.mixed_precision:
            raise ValueError(
                f"mixed_precision={self.mixed_precision!r} and accelerator_kwargs"
                f"['mixed_precision']={other!r} disagree; set it once, in mixed_precision"
            )
        # Resolved again at train() start; until then every point is called.
        self._per_batch_points = frozenset(PER_BATCH_POINTS)

    @property
    def pending_loss_sum(self) -> torch.Tensor:  # documented with the attributes above
        return self._pending_losses.total()

    @property
    def step(self) -> int:
        """Optimizer updates done so far, global: ``self.progress.step``."""
        return self.progress.step

    @step.setter
    def step(self, value: int) -> None:
        self.progress.step = value

    @property
    def epoch(self) -> int:
        """Epochs completed so far: ``self.progress.epoch``."""
        return self.progress.epoch

    @epoch.setter
    def epoch(self, value: int) -> None:
        self.progress.epoch = value

    # ------------------------------------------------------------------ user API

    @abstractmethod
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Compute the loss of one training batch.

        Args:
            batch: one batch from ``train_dataloader``, already on the right device.
            batch_idx: the batch's index within the epoch.

        Returns:
            The scalar loss tensor. The loop calls ``backward`` on it, so do not.
        """

    @abstractmethod
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Process one validation batch: accumulate whatever your metrics need.

        Runs under ``torch.no_grad()`` with the model in ``eval()`` mode. Use
        ``self.accelerator.gather_for_metrics`` to collect predictions from every
        process; report the result from :meth:`get_val_metrics`.
        """

    def get_val_metrics(self) -> dict[str, Any]:
        """Return this epoch's validation metrics, for example ``{"accuracy": 0.93}``.

        Called once after :meth:`on_validation_end`. Values may be floats or scalar
        tensors; on several processes they are averaged so every process agrees
        (gather in :meth:`validation_step` to compute exact global metrics).
        """
        return {}

    def on_train_start(self) -> None:
        """Called once, after the accelerator is set up and any checkpoint is restored."""

    def on_train_end(self) -> None:
        """Called once, after the last epoch (also after early stopping)."""

    def on_train_epoch_start(self) -> None:
        """Called at the start of every training epoch, before its first batch."""

    def on_train_epoch_end(self) -> None:
        """Called at the end of every epoch, after validation, checkpoints and the
        early-stopping check (``self.epoch`` already counts this epoch). Also called,
        with nothing else done, when a stop cuts an epoch short."""

    def on_validation_start(self) -> None:
        """Called before the first validation batch: reset your metric accumulators."""

    def on_validation_end(self) -> None:
        """Called after the last validation batch, before :meth:`get_val_metrics`."""

    def predict_step(self, batch: Any, batch_idx: int) -> Any:
        """Return the model's output for one batch of :meth:`predict`'s loader.

        Runs under ``torch.no_grad()`` with the model in ``eval()`` mode. Return a
        tensor with the batch along dim 0, or a dict, tuple or list of them; the
        default is ``self.model(batch)``. Do not gather: :meth:`predict` does.
        """
        return self.model(batch)

    # ---------------------------------------------------------------- evaluation

    def validate(self, checkpoint: str | None = None) -> dict[str, float]:
        """Run the validation loop once, outside training, and return its metrics.

        The same loop as after each epoch (``on_validation_start``,
        ``validation_step`` per batch, ``on_validation_end``, ``get_val_metrics``,
        averaged so every process returns the same dict), on ``val_dataloader``.
        Call it on every process. Before :meth:`train` it sets up the accelerator and
        prepares the model and the validation loader for inference (once; a later
        ``train()`` starts from the plain objects again); after ``train()`` it uses
        the prepared ones.

        Nothing of the run changes: no checkpoint, log line or run lock is written,
        ``val_metrics`` keeps the last training validation's, the random states and
        the model's train/eval mode are put back. The one lasting effect: with a
        ``checkpoint``, its weights are loaded into ``self.model`` and stay there.

        Args:
            checkpoint: whose weights to evaluate: a checkpoint name in
                ``checkpoint_dir`` (``"best"``, ``"step_20"``), ``"latest"``, or a path
                or URL to a checkpoint directory. Needs :class:`~accel_hydra.CheckpointMixin`;
                the checkpoint must be committed and is verified file by file and
                loaded without running code. ``None``: the model's current weights.

        Returns:
            ``{metric name: float}``, as ``get_val_metrics`` returned it, agreed.

        Raises:
            ValueError: there is no ``val_dataloader``, or a ``checkpoint`` was given to
                a trainer without ``CheckpointMixin``.
            CheckpointNotFoundError: no such committed checkpoint (the message lists
                the committed ones).

        Example:
            >>> metrics = trainer.validate(checkpoint="best")  # doctest: +SKIP
        """
        if self.val_dataloader is None:
            raise ValueError(
                "validate() needs a val_dataloader; give the trainer one, or call "
                "test(dataloader) with the loader to evaluate"
            )
        self._setup_for_evaluation()
        loader = self.val_dataloader
        with self._evaluation(checkpoint):
            self._validation_pass(loader)
            return self._agreed_val_metrics()

    def test(self, dataloader: Iterable, checkpoint: str | None = None) -> dict[str, float]:
        """Like :meth:`validate`, on ``dataloader`` instead of ``val_dataloader``.

        The loader is prepared with ``even_batches=True`` (whatever the run uses), so
        ``gather_for_metrics`` in your ``validation_step`` drops Accelerate's padding.

        Returns:
            ``{metric name: float}`` from ``get_val_metrics``, agreed on every process.
        """
        self._setup_for_evaluation()
        loader = prepare_eval_loader(self.accelerator, dataloader)
        with self._evaluation(checkpoint):
            self._validation_pass(loader)
            return self._agreed_val_metrics()

    def predict(self, dataloader: Iterable, checkpoint: str | None = None) -> Any:
        """Run :meth:`predict_step` on every batch; return all outputs, in dataset order.

        Under N processes each batch's outputs are gathered with
        ``gather_for_metrics``: every process returns the whole result, and the
        samples Accelerate repeats to even out the last batches are dropped, so there
        are exactly as many rows as the dataset has samples (for a loader with a
        length; a sampler that shuffles gives the sampled order). Tensors are
        concatenated along dim 0, dicts/tuples/lists of them per key or position;
        everything is on CPU. ``checkpoint`` and side effects as in :meth:`validate`.

        Returns:
            The joined outputs (see ``accel_hydra.evaluation.concatenate_outputs``),
            or ``None`` when the loader yields no batch.

        Example:
            >>> logits = trainer.predict(test_loader, checkpoint="best")  # doctest: +SKIP
        """
        self._setup_for_evaluation()
        loader = prepare_eval_loader(self.accelerator, dataloader)
        outputs = []
        with self._evaluation(checkpoint):
            for batch_idx, batch in enumerate(loader):
                output = self.predict_step(batch, batch_idx)
                outputs.append(outputs_to_cpu(self.accelerator.gather_for_metrics(output)))
        return concatenate_outputs(outputs)

    def _setup_for_evaluation(self) -> None:
        """Prepare the model and the validation loader for inference, once.

        Only what an evaluation needs: no optimizer or training loader, no directory
        checks, no mixin set-up (run lock, writers), so nothing is written. After
        ``train()`` (or an earlier evaluation) everything is already prepared.
        """
        if self.accelerator is not None:
            return
        group_existed = process_group_exists()
        self.accelerator = Accelerator(**self._accelerator_kwargs())
        if not group_existed:
            leave_process_group_at_exit()
        self.model = self.accelerator.prepare_model(self.model, evaluation_mode=True)
        if self.val_dataloader is not None:
            self._unprepared_val_dataloader = self.val_dataloader
            self.val_dataloader = self.accelerator.prepare_data_loader(self.val_dataloader)
        self.single_process = self.accelerator.num_processes == 1

    @contextlib.contextmanager
    def _evaluation(self, checkpoint: str | None) -> Iterator[None]:
        """Load ``checkpoint``'s weights, then run the body in eval mode without
        gradients; the random states and the model's mode are put back after it
        (creating a data iterator draws from the RNGs)."""
        rng = capture_rng_state()
        was_training = self.model.training
        try:
            if checkpoint is not None:
                self._load_checkpoint_weights(str(checkpoint))
            self.model.eval()
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)
            restore_rng_state(rng)

    # ------------------------------------------------------------------ the loop

    def train(self, seed: int | None = None) -> None:
        """Run the whole training.

        The loop, in order (``docs/trainer.rst`` draws the same flow)::

            set_seed(seed); setup_accelerator(); check directories are writable
            restore checkpoint; sanity validation (sanity_val_batches); on_train_start()
            resolve the per-batch extension points the class overrides (only those run)
            while epoch < epochs and not should_stop_training:
                on_train_epoch_start()
                while not progress.epoch_done():   # asked before each fetch
                    batch = next batch (a resumed epoch starts at progress.batch;
                                        a loader without len() may end the epoch)
                    loss = training_step(batch, batch_idx); backward(loss)
                    on an update: clip gradients; NaN flag on the device (a fused
                                  optimizer skips a bad update); optimizer step;
                                  step += 1; LR step (step interval); log (a
                                  non-finite loss read stops the run); step checkpoint;
                                  on SIGTERM/SIGINT: checkpoint and exit
                    if should_stop_training: on_train_epoch_end(); end the run
                if val_dataloader: on_validation_start(); validation_step(...) per batch;
                                   on_validation_end(); metrics = get_val_metrics()
                progress.finish_epoch() (epoch += 1); LR step (epoch interval);
                epoch checkpoint;
                best checkpoint if the monitored metric improved; early-stopping check;
                on SIGTERM/SIGINT: checkpoint and exit
                on_train_epoch_end()
            on_train_end()

        An exception from the loop (yours, or the interruption) is the one ``train``
        raises: if the clean-up after it (``_after_train``: waiting for an upload,
        closing the logs) fails too, that second error is printed and attached to the
        first as a note, never raised in its place.

        Args:
            seed: seeds Python, NumPy and torch on every process before the
                accelerator is set up, so shuffling and dropout repeat exactly. (Seed
                before building the model too, as the launcher does, for identical
                initial weights.)

        Raises:
            TrainingInterrupted: after SIGTERM or a first SIGINT, once a checkpoint is
                written; it exits the process with ``128 + signal`` unless caught.
            RuntimeError: ``train`` was already called on this trainer.
        """
        if self._train_called:
            raise RuntimeError(
                f"train() was already called on this {type(self).__name__}: that call "
                "prepared its model, optimizer and dataloaders and closed its writers. "
                "Build a new trainer to train again; to continue this run, give it "
                "resume_from_checkpoint='latest' (with a larger epochs to train longer)"
            )
        self._train_called = True
        if seed is not None:
            set_seed(seed)
        self.setup_accelerator()
        try:
            self._restore()
            self._sanity_validation()
            self._before_training()
            for action in self._run_start_actions:
                action()
        except BaseException as error:
            # Nothing trained: let go of what set-up took (the run lock), keep the error.
            self._after_train_keeping(error)
            raise
        self._say(format_summary("accel_hydra: starting", self._summary_lines()))
        try:
            with self._preemption:
                self.on_train_start()
                self._per_batch_points = overridden_points(self, LoopBase)
                while self.progress.epoch < self.epochs and not self.should_stop_training:
                    self._run_epoch()
                self.on_train_end()
        except BaseException as error:
            self._after_train_keeping(error)
            raise
        self._after_train()
        self._say(format_summary("accel_hydra: done", self._end_summary_lines()))

    def _after_train_keeping(self, error: BaseException) -> None:
        """Run ``_after_train`` while ``error`` propagates; a failure of its own is
        reported and attached to ``error``, which stays the exception the user sees."""
        try:
            self._after_train()
        except Exception as follow_up:
            note = (
                f"accel_hydra: while stopping after {type(error).__name__}, the clean-up "
                f"failed too: {type(follow_up).__name__}: {follow_up}"
            )
            if hasattr(error, "add_note"):  # Python 3.11+
                error.add_note(note)
            print(note, file=sys.stderr, flush=True)

    def setup_accelerator(self) -> None:
        """Create the ``Accelerator``, prepare model, optimizer and dataloaders, and
        compile the model when ``compile`` asks (its toolchain checked first)."""
        if self.accelerator is not None:
            # An evaluation before train() prepared the model alone, for inference:
            # start again from the plain objects, as a trainer that never evaluated.
            model = self.accelerator.unwrap_model(self.model, keep_fp32_wrapper=False)
            # Accelerate marks a module it prepared and would return it as it is (not
            # wrapped in DDP) from the next prepare.
            vars(model).pop("_is_accelerate_prepared", None)
            self.model = model
            if self._unprepared_val_dataloader is not None:
                self.val_dataloader = self._unprepared_val_dataloader
            self._unprepared_val_dataloader = None
        group_existed = process_group_exists()
        self.accelerator = Accelerator(**self._accelerator_kwargs())
        if not group_existed:
            leave_process_group_at_exit()
        if self._compile_options is not None:  # before anything is prepared or written
            check_toolchain(self._compile_options, self.accelerator.device)
        if not isinstance(self.optimizer, torch.optim.Optimizer) and callable(self.optimizer):
            self.optimizer = self.optimizer(self.model.parameters())
        prepared = [self.model, self.optimizer, self.train_dataloader]
        if self.val_dataloader is not None:
            prepared.append(self.val_dataloader)
        prepared = self.accelerator.prepare(*prepared)
        self.model, self.optimizer, self.train_dataloader = prepared[:3]
        if self._block_epoch_order:
            use_block_order(self.train_dataloader)
        if self.val_dataloader is not None:
            self.val_dataloader = prepared[3]
        self.single_process = self.accelerator.num_processes == 1
        self._size_epochs()
        self.direct_updates = self._allow_direct_updates and direct_updates_are_exact(
            self.accelerator, self.optimizer, self.gradient_accumulation_steps
        )
        # The loop steps the wrapped optimizer itself when Accelerate's wrapper adds nothing.
        self._stepped_optimizer = (
            self.optimizer.optimizer if self.direct_updates else self.optimizer
        )
        self._pending_losses = PendingLosses(self.accelerator.device)
        if self.init_from:
            apply_init_from(self)
        if self._compile_options is not None:
            # Accelerate keeps the prepared (uncompiled) model for save_state/load_state,
            # so checkpoints stay free of the compiled wrapper's "_orig_mod." prefix.
            self.model = cast(torch.nn.Module, torch.compile(self.model, **self._compile_options))
        # Before any mixin's set-up writes (the run lock, writers): a directory that
        # cannot be written fails here in one line, and nothing is left behind.
        self._check_writable()
        self._after_prepare()

    def _size_epochs(self) -> None:
        available: int | None
        try:
            available = len(cast(Sized, self.train_dataloader))
        except TypeError:
            available = None
        if self.epoch_length is not None:
            total = self.epoch_length
        elif available is not None:
            total = available
        else:
            raise ValueError(
                "train_dataloader has no len(); set epoch_length to the number of batches per epoch"
            )
        if available is not None and total > available:
            raise ValueError(
                f"epoch_length={self.epoch_length} exceeds the {available} batches this "
                "process's train_dataloader yields; lower epoch_length or leave it unset"
            )
        if self.accelerator.num_processes > 1:
            # Uneven shards (even_batches=False): every process must run the same number
            # of updates, or the gradient all-reduce of the longest one waits forever.
            counts = self.accelerator.gather(torch.tensor([total], device=self.accelerator.device))
            total = int(counts.min().item())
        self.progress.epoch_batches = total
        # A cut-short epoch never reaches the dataloader's end, where Accelerate would
        # flush a partial accumulation; the loop forces that update itself instead.
        self._truncated_epoch = available is None or total < available
        # Without len(), the loader may also end before epoch_length: ask it at each batch.
        self._ends_with_loader = available is None
        self.updates_per_epoch = math.ceil(total / self.gradient_accumulation_steps)

    def _run_epoch(self) -> None:
        self.on_train_epoch_start()
        self.model.train()
        progress = self.progress
        bar = EpochProgress(
            enabled=self.progress_bar and self.accelerator.is_main_process,
            total=progress.epoch_batches,
            initial=progress.batch,
            epoch=progress.epoch,
            epochs=self.epochs,
            interval=self.progress_interval,
        )
        if self._run_clock is None:
            self._run_clock = (time.perf_counter(), self._run_batches_done())
        draws = self.progress_bar and self.accelerator.is_main_process
        self._start_train_clock()
        try:
            for batch_idx, batch in self._epoch_batches():
                self._train_batch(batch, batch_idx)
                if draws:
                    bar.advance()
                    if self.pending_loss_count == 0:  # the loss was read on this update
                        bar.show(self._progress_values())
                if self.should_stop_training:
                    break
            self._stop_train_clock()
            self._read_loss()
            bar.show(self._progress_values())
        finally:
            self._stop_train_clock()
            bar.close()
        if self.should_stop_training:  # asked for during the batches: skip epoch-end work
            self.on_train_epoch_end()
            return
        metrics = self._validate() if self.val_dataloader is not None else {}
        progress.finish_epoch()
        if self.val_dataloader is not None:
            self._after_validation(metrics)
        self._epoch_end_schedule(metrics)
        self._epoch_end_checkpoint(metrics)
        self._epoch_end_stop_check(metrics)
        if self._interrupt_requested(sync_point=True):
            self._stop_for_interrupt()
        self.on_train_epoch_end()

    def _epoch_batches(self) -> Iterator[tuple[int, Any]]:
        """Yield ``(batch_idx, batch)`` for the rest of this epoch, from ``progress.batch``.

        "Is the epoch done?" is asked before every fetch, never after: a run resumed
        from a checkpoint taken on the epoch's last batch fetches nothing, and a
        dataloader longer than the epoch is never read past it. The epoch number seeds
        the sampler, so epoch ``e`` sees the same order whether or not the process
        restarted; a mid-epoch resume skips sampler indices, it does not load and
        discard the skipped batches.
        """
        progress = self.progress
        start, total = progress.batch, progress.epoch_batches
        loader = self.train_dataloader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(progress.epoch)
        if progress.epoch_done():
            self._restore_rng_after_resume()
            return
        if start:
            loader = self.accelerator.skip_first_batches(loader, start)
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(progress.epoch)
        batches = iter(loader)
        batch_idx = start
        # Progress.epoch_done() inlined: this test runs once per batch.
        while batch_idx < total:
            batch = next(batches, _EXHAUSTED)
            if self._rng_after_restore is not None:
                # Creating the skipping iterator drew from the RNGs; the original run
                # had drawn that before its checkpoint, so put the saved state back.
                self._restore_rng_after_resume()
            if batch is _EXHAUSTED:  # a dataloader without len() ended early
                return
            yield batch_idx, batch
            batch_idx += 1

    def _restore_rng_after_resume(self) -> None:
        if self._rng_after_restore is not None:
            restore_rng_state(self._rng_after_restore)
            self._rng_after_restore = None

    def _train_batch(self, batch: Any, batch_idx: int) -> None:
        if self.direct_updates:
            sync = self._direct_sync(batch_idx)
            self._forward_backward(batch, batch_idx)
            applied = sync and self._apply_update()
        else:
            accelerator = self.accelerator
            if self._truncated_epoch and batch_idx + 1 == self.progress.epoch_batches:
                # Make accumulate() sync on this batch, as it would at a dataloader's end.
                accelerator.step = self.gradient_accumulation_steps - 1
            with accelerator.accumulate(self.model):
                self._forward_backward(batch, batch_idx)
                sync = accelerator.sync_gradients
                applied = sync and self._apply_update()
        if sync and not applied:
            return  # vetoed (NaN guard): the bad update never reached the parameters
        progress = self.progress
        progress.batch = batch_idx + 1
        if not sync:
            progress.accumulated += 1
            return
        progress.accumulated = 0
        progress.step += 1
        points = self._per_batch_points
        if "_after_optimizer_step" in points:
            self._after_optimizer_step()
        if "_is_logging_step" in points and self._is_logging_step():
            self._read_loss()
        if "_after_update" in points:
            # Logs and step checkpoints are not training time: the train clock stops
            # around them (_stop_train_clock/_start_train_clock, inlined per update).
            since = self._train_clock_since
            if since is not None:
                self._train_seconds += time.perf_counter() - since
                self._train_clock_since = None
            self._after_update()
            self._train_clock_since = time.perf_counter()
        if self.single_process:  # _interrupt_requested, inlined per update
            if self._preemption.signal_number is not None:
                self._stop_for_interrupt()
        elif self._interrupt_requested(sync_point=False):
            self._stop_for_interrupt()

    def _forward_backward(self, batch: Any, batch_idx: int) -> None:
        loss = self.training_step(batch, batch_idx)
        # PendingLosses.add, inlined: a list append per batch, no tensor op.
        unfolded = self._pending_losses.unfolded
        unfolded.append(loss.detach())
        self.pending_loss_count += 1
        if len(unfolded) == FOLD_EVERY:
            self._pending_losses.fold()
        if not self.direct_updates:
            self.accelerator.backward(loss)
        elif self.gradient_accumulation_steps > 1:
            (loss / self.gradient_accumulation_steps).backward()
        else:
            loss.backward()  # accelerator.backward divides by 1 first: the same gradients

    def _direct_sync(self, batch_idx: int) -> bool:
        """Decide whether this batch completes an update, as ``accumulate()`` would:
        every ``gradient_accumulation_steps`` batches and on the epoch's last batch
        (the dataloader's last, when one without ``len()`` ends the epoch early).
        ``sync_gradients`` and ``accelerator.step`` (saved in checkpoints) are set to
        the values Accelerate would have given them."""
        accelerator = self.accelerator
        if batch_idx + 1 == self.progress.epoch_batches or (
            self._ends_with_loader and accelerator.gradient_state.end_of_dataloader
        ):
            accelerator.step = 0
            sync = True
        else:
            accelerator.step = batch_idx + 1
            sync = (batch_idx + 1) % self.gradient_accumulation_steps == 0
        accelerator.gradient_state.sync_gradients = sync
        return sync

    def _apply_update(self) -> bool:
        """One optimizer update from the complete gradients; False if it was vetoed."""
        optimizer = self._stepped_optimizer
        points = self._per_batch_points
        if "_update_is_safe" in points and not self._update_is_safe():
            optimizer.zero_grad(set_to_none=True)
            return False
        if "_before_optimizer_step" in points:
            self._before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return True

    def _last_read_losses(self) -> torch.Tensor:
        """The batch losses the last :meth:`_read_loss` averaged, in order (float32, on
        the device); valid until the next fold (a read of ``pending_loss_sum``, or 256
        more batches), so read them right after the read."""
        return self._pending_losses.last_window()

    def _optimizer_step_was_skipped(self) -> bool:
        """Whether the grad scaler skipped the last update (inf/NaN fp16 gradients)."""
        return not self.direct_updates and self.accelerator.optimizer_step_was_skipped

    def _validate(self) -> dict[str, Any]:
        self.model.eval()
        with self._validation_context():
            self._validation_pass(self.val_dataloader if self.val_dataloader is not None else ())
        self.model.train()
        self.val_metrics = self._agreed_val_metrics()
        if self.val_metrics:
            shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(self.val_metrics.items()))
            self._say(f"epoch {self.epoch + 1}/{self.epochs} validation: {shown}")
        return self.val_metrics

    def _validation_pass(self, loader: Iterable) -> None:
        """``on_validation_start``, ``validation_step`` per batch, ``on_validation_end``."""
        self.on_validation_start()
        with torch.no_grad():
            for batch_idx, batch in enumerate(loader):
                self.validation_step(batch, batch_idx)
        self.on_validation_end()

    def _agreed_val_metrics(self) -> dict[str, float]:
        """``get_val_metrics()``, checked and averaged so every process agrees."""
        # An error on one process alone would leave the others in the metric average.
        with fail_together(self.accelerator, "get_val_metrics()"):
            metrics = self.get_val_metrics() or {}
            if not isinstance(metrics, dict):
                raise TypeError(
                    f"get_val_metrics() must return a dict of metric name -> value, "
                    f"got {type(metrics).__name__}"
                )
        return self._agree_on_metrics(metrics)

    def _sanity_validation(self) -> None:
        """Validate on ``sanity_val_batches`` batches and check the metrics they give.

        Nothing the run depends on changes: the random states are put back (creating
        a data iterator draws from them), the validation loader's pass is ended as if
        it had run to its end, and the real validation's ``on_validation_start``
        resets the accumulators. No metric is logged, agreed on or monitored.
        """
        if not self.sanity_val_batches or self.val_dataloader is None:
            return
        loader = self.val_dataloader
        rng = capture_rng_state()
        batches = iter(loader)
        try:
            self.model.eval()
            with self._validation_context():
                self.on_validation_start()
                with torch.no_grad():
                    for batch_idx, batch in zip(
                        range(self.sanity_val_batches), batches, strict=False
                    ):
                        self.validation_step(batch, batch_idx)
                self.on_validation_end()
            # As in _validate: a failure on one process must not strand the others.
            with fail_together(self.accelerator, "get_val_metrics() (sanity validation)"):
                metrics = self.get_val_metrics() or {}
        finally:
            close = getattr(batches, "close", None)
            if close is not None:
                close()
            end = getattr(loader, "end", None)  # Accelerate's loader, left mid-pass
            if end is not None:
                end()
            self.model.train()
            restore_rng_state(rng)
        if not isinstance(metrics, dict):
            raise TypeError(
                f"get_val_metrics() must return a dict of metric name -> value, "
                f"got {type(metrics).__name__}"
            )
        self._check_sanity_metrics(metrics)

    def _check_writable(self) -> None:
        """Probe every directory the run will write (main process); all raise alike."""
        message = None
        if self.accelerator.is_main_process:
            try:
                for label, url, options in self._writable_dirs():
                    if url is not None:
                        # A probe always has a bound; storage_timeout when a mixin has it.
                        timeout = getattr(self, "storage_timeout", None)
                        check_writable(label, url, options, timeout)
            except PreflightError as err:
                message = str(err)
        if self.accelerator.num_processes > 1:
            message = broadcast_object_list([message])[0]
        if message is not None:
            raise PreflightError(message)

    def _agree_on_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Average the metrics over processes, so every decision taken on them agrees."""
        if self.accelerator.num_processes == 1 or not metrics:
            return {k: _to_float(v) for k, v in metrics.items()}
        names = sorted(metrics)
        values = torch.tensor(
            [_to_float(metrics[k]) for k in names],
            dtype=torch.float64,
            device=self.accelerator.device,
        )
        values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(names, values.tolist(), strict=True))

    def _read_loss(self) -> float | None:
        """Move the mean loss of the batches since the last read to the host.

        This is the loop's only host-device sync in training: it runs on logging
        steps, before a checkpoint is written and at the end of an epoch. On several
        processes the value is averaged, so every process sees (and decides on) the
        same number.
        """
        if self.pending_loss_count == 0:
            return self.last_loss
        mean = self._pending_losses.total() / self.pending_loss_count
        if self.accelerator.num_processes > 1:
            mean = self.accelerator.reduce(mean, reduction="mean")
        self.last_loss = mean.item()
        self._pending_losses.clear()
        self._mark_throughput(self.pending_loss_count)
        self.pending_loss_count = 0
        return self.last_loss

    def _interrupt_requested(self, sync_point: bool) -> bool:
        """Whether a preemption signal asks to stop now, agreed by every process.

        One process acts on its own signal at once. Several processes agree after every
        update, whatever mixins are composed: a signal on any of them stops all at the
        same update, one update later at most (``InterruptAgreement``, no device sync);
        at a ``sync_point`` (an epoch end) they agree at once.
        """
        if self.single_process:
            return self._preemption.requested
        requested = self._preemption.requested
        if sync_point:
            return self._interrupt_agreement.now(requested)
        return self._interrupt_agreement.poll(requested)

    def _stop_for_interrupt(self) -> None:
        signum = self._preemption.signal_number or signal.SIGTERM
        saved = self._on_interrupt()
        name = signal.Signals(signum).name
        progress = self.progress
        where = f"update {progress.step} (epoch {progress.epoch + 1}, batch {progress.batch})"
        if saved:
            advice = (
                f"checkpoint saved to {saved}; to continue exactly where it stopped, "
                f"{self.resume_advice}"
            )
        else:
            advice = "no checkpoint was written (add CheckpointMixin to be able to resume)"
        message = f"accel_hydra: interrupted by {name} at {where}; {advice}"
        if self.accelerator.is_main_process:
            print(message, file=sys.stderr, flush=True)
        note_exit_status(128 + signum)
        raise TrainingInterrupted(signum, message)

    @property
    def interrupt_signal(self) -> int | None:
        """The signal (SIGTERM, SIGINT) that asked this process to stop, or None.

        Set from the moment the signal arrives; a mixin that waits during a
        preemption save (for an upload) uses it to exit with the right status.
        """
        return self._preemption.signal_number

    def _say(self, message: str) -> None:
        """Print a status line on the main process, flushed at once: a run can be
        killed at any moment, and what it said last matters most then."""
        if self.accelerator.is_main_process:
            print(message, flush=True)

    def _start_train_clock(self) -> None:
        self._train_clock_since = time.perf_counter()

    def _stop_train_clock(self) -> None:
        if self._train_clock_since is not None:
            self._train_seconds += time.perf_counter() - self._train_clock_since
            self._train_clock_since = None

    def _training_seconds(self) -> float:
        """Seconds spent in training batches so far (validation and saves excluded)."""
        running = self._train_clock_since
        return self._train_seconds + (time.perf_counter() - running if running else 0.0)

    def _mark_throughput(self, batches: int) -> None:
        now = self._training_seconds()
        last_time, _ = self._throughput_mark
        if now > last_time:
            try:
                batch_size = cast(Any, self.train_dataloader).total_batch_size or 0
            except (AttributeError, TypeError):  # batches of varying size (a batch sampler)
                batch_size = 0
            self.samples_per_second = batches * batch_size / (now - last_time)
        self._throughput_mark = (now, batches)

    def _run_batches_done(self) -> int:
        progress = self.progress
        return progress.epoch * progress.epoch_batches + progress.batch

    def _eta_seconds(self) -> float | None:
        """Wall-clock seconds to the end of the run (validation and saves included),
        from this process's pace since it started training."""
        if self._run_clock is None:
            return None
        started, batches_at_start = self._run_clock
        done = self._run_batches_done() - batches_at_start
        if done <= 0:
            return None
        left = self.epochs * self.progress.epoch_batches - self._run_batches_done()
        return (time.perf_counter() - started) / done * max(left, 0)

    def _progress_values(self) -> dict[str, str]:
        values = {"step": str(self.progress.step)}
        if self.last_loss is not None:
            values["loss"] = f"{self.last_loss:.4g}"
        values["lr"] = f"{self.optimizer.param_groups[0]['lr']:.3g}"  # type: ignore[union-attr]
        if self.samples_per_second is not None:
            values["samples/s"] = f"{self.samples_per_second:.0f}"
        eta = self._eta_seconds()
        if eta is not None:
            values["run eta"] = format_duration(eta)
        return values

    # ------------------------------------------------------------ extension points

    def _accelerator_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "project_dir": self.project_dir,
            "dataloader_config": DataLoaderConfiguration(
                even_batches=self.even_batches, use_seedable_sampler=True
            ),
        }
        if launched_without_gpus():
            kwargs["cpu"] = True
        kwargs.update(self.accelerator_kwargs)
        if self.mixed_precision is not None:
            kwargs["mixed_precision"] = self.mixed_precision
        return kwargs

    def _after_prepare(self) -> None:
        pass

    def _writable_dirs(self) -> list[tuple[str, str | None, dict | None]]:
        return [("project_dir", str(self.project_dir), None)]

    def _restore(self) -> None:
        pass

    def _check_sanity_metrics(self, metrics: dict[str, Any]) -> None:
        pass

    def _before_training(self) -> None:
        pass

    def _is_logging_step(self) -> bool:
        return False

    def _before_optimizer_step(self) -> None:
        pass

    def _after_optimizer_step(self) -> None:
        pass

    def _after_update(self) -> None:
        pass

    def _after_validation(self, metrics: dict[str, Any]) -> None:
        pass

    def _validation_context(self) -> contextlib.AbstractContextManager[None]:
        """A context entered around each validation pass; override to wrap it::

        @contextlib.contextmanager
        def _validation_context(self):
            with super()._validation_context():
                ...  # before the pass
                try:
                    yield
                finally:
                    ...  # after it, also when it failed
        """
        return contextlib.nullcontext()

    def _epoch_end_schedule(self, metrics: dict[str, Any]) -> None:
        pass

    def _epoch_end_checkpoint(self, metrics: dict[str, Any]) -> None:
        pass

    def _epoch_end_stop_check(self, metrics: dict[str, Any]) -> None:
        pass

    def _ok_to_save(self) -> bool:
        return True

    def _update_is_safe(self) -> bool:
        return True

    def _on_interrupt(self) -> str | None:
        """Save what is needed to resume; return where it went (None: nothing saved)."""
        return None

    def _after_checkpoint(self, name: str) -> None:
        pass

    def _state_to_save(self) -> dict[str, Any]:
        sampler = self._shuffling_sampler()
        return {
            "progress": self.progress.state_dict(),
            "val_metrics": dict(self.val_metrics),
            "sampler_seed": None if sampler is None else sampler.initial_seed,
            "optimizer_layout": self._optimizer_layout(),
        }

    def _optimizer_layout(self) -> dict[str, Any]:
        """The optimizer's class and tensors per param group: what its state must fit."""
        optimizer: Any = getattr(self.optimizer, "optimizer", self.optimizer)
        return {
            "class": type(optimizer).__name__,
            "param_groups": [len(group["params"]) for group in optimizer.param_groups],
        }

    def _check_resumable(self, state: dict[str, Any], label: str) -> None:
        """Raise ``ValueError`` when a checkpoint's state cannot fit this run.

        Called before anything is loaded, so a changed setup fails in one line that
        names both sides instead of deep inside ``load_state_dict``.
        """
        saved = state.get("optimizer_layout")
        if not isinstance(saved, dict):
            return  # saved before layouts were recorded
        current = self._optimizer_layout()
        if saved != current:
            raise ValueError(
                f"checkpoint {label} was saved with {_describe_layout(saved)}; this run "
                f"has {_describe_layout(current)}. Resume with the original optimizer, "
                "start fresh (resume_from_checkpoint=null), or load only the model "
                "weights (docs/checkpoints.rst, 'Changing the setup')"
            )

    def _shuffling_sampler(self) -> Any:
        """The train loader's seedable shuffling sampler, or None if it does not shuffle.

        Its seed plus the epoch number fix each epoch's order; saving the seed makes a
        resumed run shuffle like the original even when ``train()`` got no seed.
        """
        get_sampler = getattr(self.train_dataloader, "get_sampler", None)
        sampler = get_sampler() if get_sampler is not None else None
        return sampler if hasattr(sampler, "initial_seed") else None

    def _load_state(self, state: dict[str, Any]) -> None:
        progress = state.get("progress")
        if progress is None:  # written before progress was one object
            progress = {
                "epoch": state.get("epoch"),
                "step": state.get("step"),
                "batch": state.get("batches_in_epoch"),
                "epoch_batches": self.progress.epoch_batches,
                "accumulated": 0,
            }
        self.progress.load_state_dict(progress)
        self.val_metrics = dict(state.get("val_metrics", {}))
        sampler = self._shuffling_sampler()
        if sampler is not None and state.get("sampler_seed") is not None:
            sampler.initial_seed = state["sampler_seed"]
        if self.progress.batch:
            # Called after the RNG states were restored: keep them for _epoch_batches.
            self._rng_after_restore = capture_rng_state()

    def _tensors_to_save(self) -> dict[str, dict[str, torch.Tensor]]:
        """Extra tensor files for each checkpoint: ``{file_stem: {tensor_name: tensor}}``.

        A checkpointing mixin writes each entry as ``<file_stem>.safetensors`` (code-free,
        checksummed like every file of the checkpoint). Return the tensors themselves,
        not copies: the writer moves them to the host.
        """
        return {}

    def _load_tensors(self, files: dict[str, dict[str, torch.Tensor]]) -> None:
        """The inverse of :meth:`_tensors_to_save` on resume, called after ``_load_state``
        with every file the checkpoint holds (on the CPU); a stem may be missing from a
        checkpoint saved before its mixin was added."""

    def _after_train(self) -> None:
        pass

    def _load_checkpoint_weights(self, checkpoint: str) -> None:
        """Load the model weights of ``checkpoint`` into ``self.model`` (evaluation)."""
        raise ValueError(
            f"{type(self).__name__} cannot load checkpoint {checkpoint!r}: it has no "
            "CheckpointMixin; pass checkpoint=None to evaluate the current weights, or "
            "add CheckpointMixin to the trainer"
        )

    def _summary_lines(self) -> list[tuple[str, str]]:
        acc = self.accelerator
        n_params = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        lines = [
            ("processes", str(acc.num_processes)),
            ("device", str(acc.device)),
            ("mixed precision", str(acc.mixed_precision)),
            ("parameters", f"{n_params:,} ({trainable:,} trainable)"),
            *self._model_table(),
            ("epochs", f"{self.epochs} (from epoch {self.epoch}, step {self.step})"),
            (
                "updates per epoch",
                f"{self.updates_per_epoch} ({self.progress.epoch_batches} batches, "
                f"accumulation {self.gradient_accumulation_steps})",
            ),
        ]
        if self._compile_options is not None:
            lines.append(("compile", _describe_compile(self._compile_options)))
        return lines

    def _model_table(self) -> list[tuple[str, str]]:
        if not self.model_summary:
            return []
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        header, *rows = module_table(model)
        return [("model", header), *(("", row) for row in rows)]

    def _end_summary_lines(self) -> list[tuple[str, str]]:
        lines = [("epochs completed", str(self.epoch)), ("updates", str(self.step))]
        if self.last_loss is not None:
            lines.append(("last train loss", f"{self.last_loss:.4g}"))
        for name, value in sorted(self.val_metrics.items()):
            lines.append((f"last val {name}", f"{value:.4g}"))
        return lines


def _describe_layout(layout: dict[str, Any]) -> str:
    groups = layout.get("param_groups")
    sizes = ", ".join(str(n) for n in groups) if isinstance(groups, list) else "?"
    count = len(groups) if isinstance(groups, list) else "?"
    return f"optimizer {layout.get('class')} ({count} param group(s) of {sizes} tensors)"


def _describe_compile(options: dict[str, Any]) -> str:
    shown = ", ".join(f"{k}={v!r}" for k, v in sorted(options.items()))
    return f"torch.compile({shown})"


def _to_float(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)
