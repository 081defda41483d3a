"""EarlyStoppingMixin: stop when the monitored metric stalls or the loss is not finite."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from accel_hydra.mixins.monitoring import MetricMonitoringMixin
from accel_hydra.nan_guard import NonFiniteLossGuard

__all__ = ["EarlyStoppingMixin"]


@dataclass(kw_only=True, eq=False)
class EarlyStoppingMixin(MetricMonitoringMixin):
    """Stop training early.

    Every process takes the same decision: the metrics, the loss and the NaN flag are
    reduced over processes before anyone looks at them.

    Args:
        metric_monitor: the metric whose stalling stops the run (required with
            ``early_stop``).
        early_stop: patience: stop after this many validations in a row without
            improvement. ``None`` never stops on the metric.
        stop_on_nan: stop when the training loss is NaN or infinite, and write no
            checkpoint from then on, so the last saved checkpoint is the last good
            one. The check costs no host-device sync: the loss is read on logging
            steps, before every checkpoint and at epoch ends anyway, and the guard
            notices a bad loss at the first such read (``accel_hydra.nan_guard``).
            With an optimizer that can skip an update on the device (``fused=True``
            Adam, AdamW, SGD, Adagrad, without fp16's grad scaler), every update from
            the bad one on is skipped there: the parameters and optimizer state stay
            those of the last good update. With other optimizers those updates apply
            to the parameters in memory (never to a checkpoint) until the read, and
            the guard costs no tensor op between reads.

    Attributes:
        nonfinite_loss_step: the first update whose loss was NaN or infinite, once
            the guard noticed one; else ``None``.
    """

    early_stop: int | None = None
    stop_on_nan: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.early_stop is not None:
            if self.early_stop < 1:
                raise ValueError(f"early_stop (patience) must be >= 1, got {self.early_stop}")
            if self.metric_monitor is None:
                raise ValueError(
                    f"early_stop={self.early_stop} needs a metric to watch: set metric_monitor,"
                    " e.g. MetricMonitor(metric_name='loss', mode='min')"
                )
        self.nonfinite_loss_step: int | None = None
        self.stop_reason: str | None = None
        self._nan_guard: NonFiniteLossGuard | None = None

    def _before_training(self) -> None:
        super()._before_training()
        if self.stop_on_nan:
            optimizer: Any = getattr(self.optimizer, "optimizer", self.optimizer)
            reduce = None
            if not self.single_process:
                # Every process must skip the same updates, or their parameters part.
                def reduce(flag):
                    return self.accelerator.reduce(flag, reduction="sum")

            self._nan_guard = NonFiniteLossGuard(
                optimizer,
                self.accelerator.device,
                has_scaler=self.accelerator.scaler is not None,
                reduce_flag=reduce,
            )

    def _before_optimizer_step(self) -> None:
        super()._before_optimizer_step()
        guard = self._nan_guard
        if guard is not None:
            if guard.skips_on_device:
                guard.before_update(self.pending_loss_sum)
            else:  # a list append: no tensor op per update
                guard.update_ends.append(self.pending_loss_count)

    def _read_loss(self) -> float | None:
        reads = self.pending_loss_count > 0
        value = super()._read_loss()
        if (
            self.stop_on_nan
            and value is not None
            and not math.isfinite(value)
            and self.nonfinite_loss_step is None
        ):
            self._stop_for_nonfinite_loss(fresh=reads)
        if reads and self._nan_guard is not None:
            self._nan_guard.window_read()
        return value

    def _stop_for_nonfinite_loss(self, fresh: bool = True) -> None:
        guard, step = self._nan_guard, self.step
        bad = 0
        if guard is not None:
            if guard.skips_on_device:
                count = guard.bad_updates
            else:
                found = guard.bad_updates_in(self._last_read_losses()) if fresh else 0
                count = torch.tensor(float(found))
            if not self.single_process:  # without a device skip, each counted its own
                count = count.to(self.accelerator.device)
                count = self.accelerator.gather(count[None]).max()
            bad = int(count.item())
        first = step - bad + 1 if bad else step
        self.nonfinite_loss_step = first
        self.should_stop_training = True
        self.stop_reason = f"non-finite loss at update {first}"
        updates = f"update {first}" if first == step else f"updates {first} to {step}"
        if guard is not None and guard.skips_on_device and bad:
            what = f"{updates} were skipped on the device (the optimizer's found_inf)"
        else:
            what = f"{updates} changed the parameters in memory"
        self._say(
            f"accel_hydra: stopping: the loss is NaN or infinite at update {first} "
            f"(epoch {self.epoch + 1}); {what}; no checkpoint is written from now on, and "
            "the last saved checkpoint is the last good one"
        )

    def _after_train(self) -> None:
        try:
            super()._after_train()
        finally:
            if self._nan_guard is not None:
                self._nan_guard.close()

    def _ok_to_save(self) -> bool:
        if self.stop_on_nan:
            self._read_loss()
            if self.nonfinite_loss_step is not None:
                return False
        return super()._ok_to_save()

    def _epoch_end_stop_check(self, metrics: dict[str, Any]) -> None:
        super()._epoch_end_stop_check(metrics)
        monitor = self.metric_monitor
        if self.early_stop is None or monitor is None or not metrics:
            return
        if monitor.worse_count >= self.early_stop:
            self.should_stop_training = True
            self.stop_reason = (
                f"{monitor.metric_name} did not improve for {monitor.worse_count} epochs "
                f"(best {monitor.best_value:.6g})"
            )
            self._say(f"accel_hydra: early stopping: {self.stop_reason}")

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        monitor = self.metric_monitor
        if (
            self.early_stop is not None
            and monitor is not None
            and monitor.worse_count >= self.early_stop
        ):
            # The checkpoint was written just before this run stopped early.
            self.should_stop_training = True
            self.stop_reason = (
                f"the run had already stopped early ({monitor.metric_name} did not "
                f"improve for {monitor.worse_count} epochs)"
            )
            self._say(f"accel_hydra: nothing to do: {self.stop_reason}")

    def _end_summary_lines(self) -> list[tuple[str, str]]:
        lines = super()._end_summary_lines()
        if self.stop_reason:
            lines.append(("stopped early", self.stop_reason))
        return lines
