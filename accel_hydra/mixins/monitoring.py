"""The shared monitored metric: one MetricMonitor that several mixins read.

Early stopping, best-checkpoint saving and ReduceLROnPlateau all act on the same
monitored metric. Each of those mixins inherits this one, so the monitor is a single
field (``metric_monitor``) and is evaluated exactly once per validation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from accel_hydra.loop import LoopBase
from accel_hydra.monitor import MetricMonitor

__all__ = ["MetricMonitoringMixin"]


@dataclass(kw_only=True, eq=False)
class MetricMonitoringMixin(LoopBase):
    """Evaluate ``metric_monitor`` on each validation's metrics.

    Args:
        metric_monitor: the metric to watch; ``None`` watches nothing.

    Attributes:
        metric_improved: whether the last validation improved the monitored metric.
    """

    metric_monitor: MetricMonitor | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.metric_improved = False
        if self.metric_monitor is not None and self.val_dataloader is None:
            raise ValueError(
                f"metric_monitor watches {self.metric_monitor.metric_name!r}, a validation "
                "metric, but val_dataloader is None; give a val_dataloader or drop "
                "metric_monitor"
            )

    def _after_validation(self, metrics: dict[str, Any]) -> None:
        super()._after_validation(metrics)
        self.metric_improved = (
            self.metric_monitor(metrics) if self.metric_monitor is not None else False
        )

    def _check_sanity_metrics(self, metrics: dict[str, Any]) -> None:
        super()._check_sanity_metrics(metrics)
        if self.metric_monitor is None:
            return
        try:
            self.metric_monitor.value_from(metrics)
        except KeyError as err:  # the same error as after an epoch, only sooner
            raise KeyError(f"{err.args[0]} (found by the sanity validation)") from None

    def _state_to_save(self) -> dict[str, Any]:
        state = super()._state_to_save()
        if self.metric_monitor is not None:
            state["metric_monitor"] = self.metric_monitor.state_dict()
        return state

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        if self.metric_monitor is not None and "metric_monitor" in state:
            self.metric_monitor.load_state_dict(state["metric_monitor"])
