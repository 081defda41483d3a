"""LoopBase: the training loop, its user hooks and its internal extension points.

Nothing optional lives here: checkpoints, early stopping, LR schedules, logging and
gradient clipping are mixins (``accel_hydra.mixins``) that plug into the extension
points below. The order of work is fixed by :meth:`LoopBase.train` and documented in
``docs/trainer.rst``; keep the three in step.

Extension points for mixin authors (each a no-op here; override, call ``super()``
first, then add your work, so any subset of mixins composes in any order):

===============================  =======================================================
``_accelerator_kwargs()``        keyword arguments for ``Accelerator`` (returns a dict)
``_after_prepare()``             objects are prepared: build schedulers, open writers
``_restore()``                   after ``_after_prepare``: load a checkpoint to resume
``_is_logging_step()``           whether this update logs (the loss is read on it)
``_before_optimizer_step()``     gradients of an update are complete: clip them
``_after_optimizer_step()``      an update happened (``self.step`` counts it): LR step
``_after_update()``              after the LR step: log, save step checkpoints
``_read_loss()``                 the one place the loss is moved to the host
``_after_validation(metrics)``   validation metrics are known and agreed on all ranks
``_epoch_end_schedule(metrics)`` epoch-based LR step
``_epoch_end_checkpoint(...)``   epoch and best checkpoints
``_epoch_end_stop_check(...)``   early stopping
``_ok_to_save()``                veto a save (for example after a non-finite loss)
``_update_is_safe()``            veto an optimizer update before it happens
``_on_interrupt()``              a preemption signal arrived: save, return where
``_after_checkpoint(name)``      a checkpoint was saved: sync what goes with it (logs)
``_state_to_save()``             the trainer's own state, merged into each checkpoint
``_load_state(state)``           the inverse, on resume
``_after_train()``               training ended (normally or not): flush, close
``_summary_lines()``             ``(label, value)`` rows of the start summary
``_end_summary_lines()``         rows of the end summary
===============================  =======================================================
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed

from accel_hydra.compat import UPSTREAM_TRAINER_METHODS, ProjectDir, check_upstream_methods
from accel_hydra.console import EpochProgress, format_summary
from accel_hydra.direct_updates import direct_updates_are_exact
from accel_hydra.distributed import launched_without_gpus
from accel_hydra.init_weights import apply_init_from
from accel_hydra.preemption import PreemptionGuard, TrainingInterrupted
from accel_hydra.rng import capture_rng_state, restore_rng_state

__all__ = ["LoopBase"]


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
        progress_bar: draw a progress bar on the main process.
        init_from: a checkpoint (this package's, a plain Accelerate ``save_state``
            directory, or a weights file; path or URL) whose model weights are loaded
            after ``prepare``; training then starts fresh (see ``accel_hydra.init_weights``).
        init_strict: refuse weights that do not fit the model exactly; ``False`` loads
            the tensors that fit and lists the others once.

    Attributes:
        accelerator: the ``Accelerator``, once :meth:`setup_accelerator` ran.
        step: optimizer updates done so far (global; one per accumulation cycle).
        epoch: epochs completed so far.
        should_stop_training: set to ``True`` to stop; checked after every batch. Set
            during the batches, it skips the rest of the epoch and its validation.
        val_metrics: the metrics of the last validation, agreed on every process.
        last_loss: the mean loss over the batches since the last read (read on
            logging steps, before checkpoints and at epoch end only).
    """

    #: Whether the loop may call torch directly where Accelerate's per-step wrappers
    #: provably change nothing (see ``accel_hydra.direct_updates``); set ``False`` in a
    #: subclass to always go through Accelerate.
    _allow_direct_updates: ClassVar[bool] = True

    model: torch.nn.Module
    optimizer: Any
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
    init_from: str | None = None
    init_strict: bool = True

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.gradient_accumulation_steps < 1:
            raise ValueError(
                f"gradient_accumulation_steps must be >= 1, got {self.gradient_accumulation_steps}"
            )
        if self.epoch_length is not None and self.epoch_length < 1:
            raise ValueError(f"epoch_length must be >= 1 or None, got {self.epoch_length}")
        self.project_dir = ProjectDir(self.project_dir)
        check_upstream_methods(self, UPSTREAM_TRAINER_METHODS, LoopBase)
        self.accelerator: Accelerator | None = None
        self.step = 0
        self.epoch = 0
        self.should_stop_training = False
        self.val_metrics: dict[str, Any] = {}
        self.last_loss: float | None = None
        self.updates_per_epoch = 0
        self._batches_in_epoch = 0
        self._epoch_batches_total = 0
        self._truncated_epoch = False
        self._pending_loss_sum: torch.Tensor | None = None
        self._pending_loss_count = 0
        self._samples_per_second: float | None = None
        self._throughput_mark = (0.0, 0)
        self._rng_after_restore: dict[str, Any] | None = None
        self._preemption = PreemptionGuard()
        self._direct_updates = False
        self._single_process = True
        self._stepped_optimizer: Any = None

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

    # ------------------------------------------------------------------ the loop

    def train(self, seed: int | None = None) -> None:
        """Run the whole training.

        The loop, in order (``docs/trainer.rst`` draws the same flow)::

            set_seed(seed); setup_accelerator(); restore checkpoint; on_train_start()
            while epoch < epochs and not should_stop_training:
                on_train_epoch_start()
                for batch in train_dataloader (epoch_length batches, resuming mid-epoch):
                    loss = training_step(batch, batch_idx); backward(loss)
                    on an update: NaN guard (a bad update is skipped and stops the run);
                                  clip gradients; optimizer step; step += 1;
                                  LR step (step interval); log; step checkpoint;
                                  on SIGTERM/SIGINT: checkpoint and exit
                    if should_stop_training: on_train_epoch_end(); end the run
                if val_dataloader: on_validation_start(); validation_step(...) per batch;
                                   on_validation_end(); metrics = get_val_metrics()
                epoch += 1; LR step (epoch interval); epoch checkpoint;
                best checkpoint if the monitored metric improved; early-stopping check;
                on SIGTERM/SIGINT: checkpoint and exit
                on_train_epoch_end()
            on_train_end()

        Args:
            seed: seeds Python, NumPy and torch on every process before the
                accelerator is set up, so shuffling and dropout repeat exactly. (Seed
                before building the model too, as the launcher does, for identical
                initial weights.)

        Raises:
            TrainingInterrupted: after SIGTERM or a first SIGINT, once a checkpoint is
                written; it exits the process with ``128 + signal`` unless caught.
        """
        if seed is not None:
            set_seed(seed)
        self.setup_accelerator()
        self._restore()
        self._say(format_summary("accel_hydra: starting", self._summary_lines()))
        try:
            with self._preemption:
                self.on_train_start()
                while self.epoch < self.epochs and not self.should_stop_training:
                    self._run_epoch()
                self.on_train_end()
        finally:
            self._after_train()
        self._say(format_summary("accel_hydra: done", self._end_summary_lines()))

    def setup_accelerator(self) -> None:
        """Create the ``Accelerator`` and prepare model, optimizer and dataloaders."""
        self.accelerator = Accelerator(**self._accelerator_kwargs())
        if not isinstance(self.optimizer, torch.optim.Optimizer) and callable(self.optimizer):
            self.optimizer = self.optimizer(self.model.parameters())
        prepared = [self.model, self.optimizer, self.train_dataloader]
        if self.val_dataloader is not None:
            prepared.append(self.val_dataloader)
        prepared = self.accelerator.prepare(*prepared)
        self.model, self.optimizer, self.train_dataloader = prepared[:3]
        if self.val_dataloader is not None:
            self.val_dataloader = prepared[3]
        self._single_process = self.accelerator.num_processes == 1
        self._size_epochs()
        self._direct_updates = self._allow_direct_updates and direct_updates_are_exact(
            self.accelerator, self.optimizer, self.gradient_accumulation_steps
        )
        # The loop steps the wrapped optimizer itself when Accelerate's wrapper adds nothing.
        self._stepped_optimizer = (
            self.optimizer.optimizer if self._direct_updates else self.optimizer
        )
        self._pending_loss_sum = torch.zeros((), device=self.accelerator.device)
        if self.init_from:
            apply_init_from(self)
        self._after_prepare()

    def _size_epochs(self) -> None:
        try:
            available = len(self.train_dataloader)
        except TypeError:
            available = None
        if self.epoch_length is None and available is None:
            raise ValueError(
                "train_dataloader has no len(); set epoch_length to the number of batches per epoch"
            )
        if (
            self.epoch_length is not None
            and available is not None
            and self.epoch_length > available
        ):
            raise ValueError(
                f"epoch_length={self.epoch_length} exceeds the {available} batches this "
                "process's train_dataloader yields; lower epoch_length or leave it unset"
            )
        self._epoch_batches_total = self.epoch_length or available
        if self.accelerator.num_processes > 1 and self._epoch_batches_total is not None:
            # Uneven shards (even_batches=False): every process must run the same number
            # of updates, or the gradient all-reduce of the longest one waits forever.
            counts = self.accelerator.gather(
                torch.tensor([self._epoch_batches_total], device=self.accelerator.device)
            )
            self._epoch_batches_total = int(counts.min().item())
        # A cut-short epoch never reaches the dataloader's end, where Accelerate would
        # flush a partial accumulation; the loop forces that update itself instead.
        self._truncated_epoch = available is None or self._epoch_batches_total < available
        self.updates_per_epoch = math.ceil(
            self._epoch_batches_total / self.gradient_accumulation_steps
        )

    def _run_epoch(self) -> None:
        self.on_train_epoch_start()
        self.model.train()
        start = self._batches_in_epoch
        progress = EpochProgress(
            enabled=self.progress_bar and self.accelerator.is_main_process,
            total=self._epoch_batches_total,
            initial=start,
            epoch=self.epoch,
            epochs=self.epochs,
        )
        try:
            for batch_idx, batch in self._epoch_batches(start):
                self._train_batch(batch, batch_idx)
                progress.advance()
                if self._pending_loss_count == 0:  # the loss was read on this update
                    progress.show(self._progress_values())
                if self.should_stop_training:
                    break
        finally:
            progress.close()
        self._read_loss()
        if self.should_stop_training:  # asked for during the batches: skip epoch-end work
            self.on_train_epoch_end()
            return
        metrics = self._validate() if self.val_dataloader is not None else {}
        self.epoch += 1
        self._batches_in_epoch = 0
        if self.val_dataloader is not None:
            self._after_validation(metrics)
        self._epoch_end_schedule(metrics)
        self._epoch_end_checkpoint(metrics)
        self._epoch_end_stop_check(metrics)
        if self._interrupt_requested(sync_point=True):
            self._stop_for_interrupt()
        self.on_train_epoch_end()

    def _epoch_batches(self, start: int) -> Iterator[tuple[int, Any]]:
        """Yield ``(batch_idx, batch)`` for this epoch, skipping ``start`` batches by index.

        The epoch number seeds the sampler, so epoch ``e`` sees the same order whether
        or not the process restarted; a mid-epoch resume skips sampler indices, it does
        not load and discard the skipped batches.
        """
        loader = self.train_dataloader
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(self.epoch)
        if start:
            loader = self.accelerator.skip_first_batches(loader, start)
            if hasattr(loader, "set_epoch"):
                loader.set_epoch(self.epoch)
        batches = enumerate(loader, start=start)
        first = next(batches, None)
        if self._rng_after_restore is not None:
            restore_rng_state(self._rng_after_restore)
            self._rng_after_restore = None
        if first is None:
            return
        yield first
        if first[0] + 1 >= self._epoch_batches_total:
            return
        for batch_idx, batch in batches:
            yield batch_idx, batch
            if batch_idx + 1 >= self._epoch_batches_total:
                return

    def _train_batch(self, batch: Any, batch_idx: int) -> None:
        if self._direct_updates:
            sync = self._direct_sync(batch_idx)
            self._forward_backward(batch, batch_idx)
            applied = sync and self._apply_update()
        else:
            accelerator = self.accelerator
            if self._truncated_epoch and batch_idx + 1 == self._epoch_batches_total:
                # Make accumulate() sync on this batch, as it would at a dataloader's end.
                accelerator.step = self.gradient_accumulation_steps - 1
            with accelerator.accumulate(self.model):
                self._forward_backward(batch, batch_idx)
                sync = accelerator.sync_gradients
                applied = sync and self._apply_update()
        if sync and not applied:
            return  # vetoed (NaN guard): the bad update never reached the parameters
        self._batches_in_epoch = batch_idx + 1
        if sync:
            self.step += 1
            self._after_optimizer_step()
            logging_step = self._is_logging_step()
            if logging_step:
                self._read_loss()
            self._after_update()
            if self._interrupt_requested(sync_point=logging_step):
                self._stop_for_interrupt()

    def _forward_backward(self, batch: Any, batch_idx: int) -> None:
        loss = self.training_step(batch, batch_idx)
        self._pending_loss_sum += loss.detach()
        self._pending_loss_count += 1
        if not self._direct_updates:
            self.accelerator.backward(loss)
        elif self.gradient_accumulation_steps > 1:
            (loss / self.gradient_accumulation_steps).backward()
        else:
            loss.backward()  # accelerator.backward divides by 1 first: the same gradients

    def _direct_sync(self, batch_idx: int) -> bool:
        """Decide whether this batch completes an update, as ``accumulate()`` would:
        every ``gradient_accumulation_steps`` batches and on the epoch's last batch.
        ``sync_gradients`` and ``accelerator.step`` (saved in checkpoints) are set to
        the values Accelerate would have given them."""
        accelerator = self.accelerator
        if batch_idx + 1 == self._epoch_batches_total:
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
        if not self._update_is_safe():
            optimizer.zero_grad(set_to_none=True)
            return False
        self._before_optimizer_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return True

    def _optimizer_step_was_skipped(self) -> bool:
        """Whether the grad scaler skipped the last update (inf/NaN fp16 gradients)."""
        return not self._direct_updates and self.accelerator.optimizer_step_was_skipped

    def _validate(self) -> dict[str, Any]:
        self.model.eval()
        self.on_validation_start()
        with torch.no_grad():
            for batch_idx, batch in enumerate(self.val_dataloader):
                self.validation_step(batch, batch_idx)
        self.on_validation_end()
        self.model.train()
        metrics = self.get_val_metrics() or {}
        if not isinstance(metrics, dict):
            raise TypeError(
                f"get_val_metrics() must return a dict of metric name -> value, "
                f"got {type(metrics).__name__}"
            )
        self.val_metrics = self._agree_on_metrics(metrics)
        if self.val_metrics:
            shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(self.val_metrics.items()))
            self._say(f"epoch {self.epoch + 1}/{self.epochs} validation: {shown}")
        return self.val_metrics

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
        if self._pending_loss_count == 0:
            return self.last_loss
        mean = self._pending_loss_sum / self._pending_loss_count
        if self.accelerator.num_processes > 1:
            mean = self.accelerator.reduce(mean, reduction="mean")
        self.last_loss = mean.item()
        self._pending_loss_sum.zero_()
        self._mark_throughput(self._pending_loss_count)
        self._pending_loss_count = 0
        return self.last_loss

    def _interrupt_requested(self, sync_point: bool) -> bool:
        """Whether a preemption signal asks to stop now, agreed by every process.

        One process acts on its own signal at once. Several processes agree on it only
        at sync points (logging steps, epoch ends), where they meet anyway, so the
        check adds no sync to other updates.
        """
        if self._single_process:
            return self._preemption.requested
        if not sync_point:
            return False
        flag = torch.tensor(float(self._preemption.requested), device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, reduction="max").item())

    def _stop_for_interrupt(self) -> None:
        signum = self._preemption.signal_number or signal.SIGTERM
        saved = self._on_interrupt()
        name = signal.Signals(signum).name
        where = f"update {self.step} (epoch {self.epoch + 1}, batch {self._batches_in_epoch})"
        if saved:
            advice = (
                f"checkpoint saved to {saved}; run the same command with "
                "resume_from_checkpoint=latest to continue exactly where it stopped"
            )
        else:
            advice = "no checkpoint was written (add CheckpointMixin to be able to resume)"
        message = f"accel_hydra: interrupted by {name} at {where}; {advice}"
        if self.accelerator.is_main_process:
            print(message, file=sys.stderr, flush=True)
        raise TrainingInterrupted(signum, message)

    def _say(self, message: str) -> None:
        """Print a status line on the main process, flushed at once: a run can be
        killed at any moment, and what it said last matters most then."""
        if self.accelerator.is_main_process:
            print(message, flush=True)

    def _mark_throughput(self, batches: int) -> None:
        now = time.perf_counter()
        last_time, _ = self._throughput_mark
        if last_time:
            try:
                batch_size = self.train_dataloader.total_batch_size or 0
            except (AttributeError, TypeError):  # batches of varying size (a batch sampler)
                batch_size = 0
            self._samples_per_second = batches * batch_size / max(now - last_time, 1e-9)
        self._throughput_mark = (now, batches)

    def _progress_values(self) -> dict[str, str]:
        values = {"step": str(self.step)}
        if self.last_loss is not None:
            values["loss"] = f"{self.last_loss:.4g}"
        values["lr"] = f"{self.optimizer.param_groups[0]['lr']:.3g}"
        if self._samples_per_second is not None:
            values["samples/s"] = f"{self._samples_per_second:.0f}"
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
        return kwargs

    def _after_prepare(self) -> None:
        pass

    def _restore(self) -> None:
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
            "epoch": self.epoch,
            "step": self.step,
            "batches_in_epoch": self._batches_in_epoch,
            "val_metrics": dict(self.val_metrics),
            "sampler_seed": None if sampler is None else sampler.initial_seed,
        }

    def _shuffling_sampler(self) -> Any:
        """The train loader's seedable shuffling sampler, or None if it does not shuffle.

        Its seed plus the epoch number fix each epoch's order; saving the seed makes a
        resumed run shuffle like the original even when ``train()`` got no seed.
        """
        get_sampler = getattr(self.train_dataloader, "get_sampler", None)
        sampler = get_sampler() if get_sampler is not None else None
        return sampler if hasattr(sampler, "initial_seed") else None

    def _load_state(self, state: dict[str, Any]) -> None:
        self.epoch = int(state["epoch"])
        self.step = int(state["step"])
        self._batches_in_epoch = int(state["batches_in_epoch"])
        self.val_metrics = dict(state.get("val_metrics", {}))
        sampler = self._shuffling_sampler()
        if sampler is not None and state.get("sampler_seed") is not None:
            sampler.initial_seed = state["sampler_seed"]
        if self._batches_in_epoch:
            # Called after the RNG states were restored: keep them for _epoch_batches.
            self._rng_after_restore = capture_rng_state()

    def _after_train(self) -> None:
        pass

    def _summary_lines(self) -> list[tuple[str, str]]:
        acc = self.accelerator
        n_params = sum(p.numel() for p in self.model.parameters())
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        return [
            ("processes", str(acc.num_processes)),
            ("device", str(acc.device)),
            ("mixed precision", str(acc.mixed_precision)),
            ("parameters", f"{n_params:,} ({trainable:,} trainable)"),
            ("epochs", f"{self.epochs} (from epoch {self.epoch}, step {self.step})"),
            (
                "updates per epoch",
                f"{self.updates_per_epoch} ({self._epoch_batches_total} batches, "
                f"accumulation {self.gradient_accumulation_steps})",
            ),
        ]

    def _end_summary_lines(self) -> list[tuple[str, str]]:
        lines = [("epochs completed", str(self.epoch)), ("updates", str(self.step))]
        if self.last_loss is not None:
            lines.append(("last train loss", f"{self.last_loss:.4g}"))
        for name, value in sorted(self.val_metrics.items()):
            lines.append((f"last val {name}", f"{value:.4g}"))
        return lines


def _to_float(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)
