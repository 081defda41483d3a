"""MetricMonitor: decides whether a validation metric improved.

A plain object with no knowledge of the loop, so the policy can be tested on its own
and shared by early stopping, best-checkpoint saving and ReduceLROnPlateau.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["MetricMonitor"]


@dataclass(kw_only=True)
class MetricMonitor:
    """Track one metric and tell whether the latest value improved on the best so far.

    Args:
        metric_name: key to read from the dict returned by ``get_val_metrics()``.
        mode: ``"min"`` when lower is better (a loss), ``"max"`` when higher is better.
        min_delta: the smallest change that counts as an improvement.

    Example:
        >>> monitor = MetricMonitor(metric_name="accuracy", mode="max")
        >>> monitor({"accuracy": 0.9}), monitor({"accuracy": 0.85})
        (True, False)
        >>> monitor.best_value, monitor.worse_count
        (0.9, 1)
    """

    metric_name: str = "loss"
    mode: Literal["min", "max"] = "min"
    min_delta: float = 0.0
    best_value: float | None = field(default=None, init=False)
    worse_count: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"MetricMonitor.mode must be 'min' or 'max', got {self.mode!r}")
        if self.min_delta < 0:
            raise ValueError(f"MetricMonitor.min_delta must be >= 0, got {self.min_delta}")

    def value_from(self, metrics: Mapping[str, Any]) -> float:
        """Return the monitored value from ``metrics`` as a float.

        Raises:
            KeyError: the metric is missing; the message lists the keys that were returned.
        """
        if self.metric_name not in metrics:
            raise KeyError(
                f"metric {self.metric_name!r} not in get_val_metrics() keys {sorted(metrics)}; "
                "set metric_monitor.metric_name to one of them"
            )
        value = metrics[self.metric_name]
        return float(value.item() if hasattr(value, "item") else value)

    def is_improvement(self, value: float) -> bool:
        """Whether ``value`` beats the best value by more than ``min_delta`` (no update)."""
        if math.isnan(value):
            return False
        if self.best_value is None:
            return True
        if self.mode == "min":
            return value < self.best_value - self.min_delta
        return value > self.best_value + self.min_delta

    def __call__(self, metrics: Mapping[str, Any]) -> bool:
        """Record the metric from ``metrics``; return True when it improved."""
        value = self.value_from(metrics)
        if self.is_improvement(value):
            self.best_value = value
            self.worse_count = 0
            return True
        self.worse_count += 1
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"best_value": self.best_value, "worse_count": self.worse_count}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_value = state["best_value"]
        self.worse_count = int(state["worse_count"])
