"""EarlyStoppingMixin: stop when the monitored metric stalls or the loss is not finite."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from accel_hydra.mixins.monitoring import MetricMonitoringMixin

__all__ = ["EarlyStoppingMixin"]


@dataclass(kw_only=True, eq=False)
class EarlyStoppingMixin(MetricMonitoringMixin):
    """Stop training early.

    Args:
        metric_monitor: the metric whose stalling stops the run (required with
            ``early_stop``).
        early_stop: patience: stop after this many validations in a row without
            improvement. ``None`` never stops on the metric.
        stop_on_nan: before each optimizer update, check that the loss of the batches
            making it is finite; if not, skip the update (the parameters and optimizer
            state stay as they were), stop, and write no checkpoint from then on. This
            reads one flag from the device per update; set ``False`` to avoid that sync
            when you would rather not pay for the guard.

    Every process takes the same decision: the metrics, the loss and the NaN flag are
    reduced over processes before anyone looks at them.
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

    def _update_is_safe(self) -> bool:
        if self.stop_on_nan and self.nonfinite_loss_step is None:
            # One read per update: the price of never applying a NaN update. Reading the
            # sum itself costs one op; a NaN or infinity anywhere keeps the sum non-finite.
            total = self.pending_loss_sum
            if not self.single_process:
                total = self.accelerator.reduce(total, reduction="sum")
            if not math.isfinite(total.item()):
                self._stop_for_nonfinite_loss(step=self.step + 1, skipped=True)
                return False
        return super()._update_is_safe()

    def _read_loss(self) -> float | None:
        value = super()._read_loss()
        if (
            self.stop_on_nan
            and value is not None
            and not math.isfinite(value)
            and self.nonfinite_loss_step is None
        ):
            self._stop_for_nonfinite_loss(step=self.step, skipped=False)
        return value

    def _stop_for_nonfinite_loss(self, step: int, skipped: bool) -> None:
        self.nonfinite_loss_step = step
        self.should_stop_training = True
        self.stop_reason = f"non-finite loss at update {step}"
        what = "that update was skipped" if skipped else "no checkpoint is written from now on"
        self._say(
            f"accel_hydra: stopping: the loss is NaN or infinite at update {step} "
            f"(epoch {self.epoch + 1}); {what}, and the last saved checkpoint is the last "
            "good one"
        )

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
