"""LRSchedulingMixin: step an LR scheduler once per optimizer update, or once per epoch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from accel_hydra.mixins.monitoring import MetricMonitoringMixin
from accel_hydra.schedules import build_lr_scheduler, is_lr_scheduler, warmup_length

__all__ = ["LRSchedulingMixin"]


@dataclass(kw_only=True, eq=False)
class LRSchedulingMixin(MetricMonitoringMixin):
    """Drive a learning-rate scheduler from the loop.

    Args:
        lr_scheduler: an ``LRScheduler`` built on the optimizer, or a callable (a Hydra
            ``_partial_``) called after ``accelerator.prepare`` with the optimizer and,
            where its signature requires one, the schedule length (``num_training_steps``,
            ``total_steps``, ``T_max`` or ``total_iters``) computed from the true
            number of updates. ``ReduceLROnPlateau`` is stepped with the monitored metric.
        lr_scheduler_interval: ``"step"`` steps once per optimizer update (never once per
            batch or per process, so gradient accumulation and the number of processes
            do not change the schedule); ``"epoch"`` steps once per epoch.
        warmup_steps: updates of warmup: filled into a ``num_warmup_steps`` argument,
            or a linear warmup put in front of any other schedule (which is then sized
            to the updates left). Needs ``lr_scheduler`` as a callable.
        warmup_ratio: the same, as a fraction of all updates (give one of the two).

    The scheduler is not handed to ``accelerator.prepare`` (which would step it once per
    process); its state is saved in every checkpoint.
    """

    lr_scheduler: (
        LRScheduler | ReduceLROnPlateau | Callable[..., LRScheduler | ReduceLROnPlateau] | None
    ) = None
    lr_scheduler_interval: Literal["step", "epoch"] = "step"
    warmup_steps: int | None = None
    warmup_ratio: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self._sized_for: int | None = None
        if self.lr_scheduler_interval not in ("step", "epoch"):
            raise ValueError(
                "lr_scheduler_interval must be 'step' or 'epoch', "
                f"got {self.lr_scheduler_interval!r}"
            )
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("give warmup_steps or warmup_ratio, not both")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.warmup_ratio is not None and not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        warming = bool(self.warmup_steps or self.warmup_ratio)
        if warming and (self.lr_scheduler is None or is_lr_scheduler(self.lr_scheduler)):
            raise ValueError(
                "warmup_steps/warmup_ratio need lr_scheduler as a callable (a Hydra "
                "_partial_), so the warmup and the schedule can be sized together"
            )
        if self.lr_scheduler is not None and not (
            is_lr_scheduler(self.lr_scheduler) or callable(self.lr_scheduler)
        ):
            raise TypeError(
                "lr_scheduler must be an LRScheduler or a callable taking the optimizer, "
                f"got {type(self.lr_scheduler).__name__}"
            )

    def _after_prepare(self) -> None:
        super()._after_prepare()
        if self.lr_scheduler is None:
            return
        if not is_lr_scheduler(self.lr_scheduler):
            optimizer = getattr(self.optimizer, "optimizer", self.optimizer)
            per_epoch = self.updates_per_epoch if self.lr_scheduler_interval == "step" else 1
            total = self.epochs * per_epoch
            self.lr_scheduler = build_lr_scheduler(
                self.lr_scheduler,
                optimizer,
                total_steps=total,
                warmup_steps=warmup_length(total, self.warmup_steps, self.warmup_ratio),
            )
            self._sized_for = total
        if isinstance(self.lr_scheduler, ReduceLROnPlateau):
            if self.lr_scheduler_interval != "epoch":
                raise ValueError(
                    "ReduceLROnPlateau steps on a validation metric: set "
                    "lr_scheduler_interval='epoch'"
                )
            if self.metric_monitor is None:
                raise ValueError(
                    "ReduceLROnPlateau needs the metric to watch: set metric_monitor, e.g. "
                    "MetricMonitor(metric_name='loss', mode='min')"
                )

    def _after_optimizer_step(self) -> None:
        super()._after_optimizer_step()
        if (
            self.lr_scheduler is not None
            and self.lr_scheduler_interval == "step"
            and not self._optimizer_step_was_skipped()
        ):
            self.lr_scheduler.step()  # type: ignore[union-attr]

    def _epoch_end_schedule(self, metrics: dict[str, Any]) -> None:
        super()._epoch_end_schedule(metrics)
        if self.lr_scheduler is None or self.lr_scheduler_interval != "epoch":
            return
        if isinstance(self.lr_scheduler, ReduceLROnPlateau):
            if metrics and self.metric_monitor is not None:  # required: see _after_prepare
                self.lr_scheduler.step(self.metric_monitor.value_from(metrics))
        else:
            self.lr_scheduler.step()  # type: ignore[union-attr]

    def _state_to_save(self) -> dict[str, Any]:
        state = super()._state_to_save()
        if self.lr_scheduler is not None:
            state["lr_scheduler"] = self.lr_scheduler.state_dict()  # type: ignore[union-attr]
            state["lr_scheduler_class"] = type(self.lr_scheduler).__name__
            state["lr_scheduler_sized_for"] = self._sized_for
        return state

    def _check_resumable(self, state: dict[str, Any], label: str) -> None:
        super()._check_resumable(state, label)
        saved = state.get("lr_scheduler_class") if "lr_scheduler" in state else None
        if "lr_scheduler" in state and saved is None:
            saved = "an LR scheduler"  # saved before the class was recorded
        current = None if self.lr_scheduler is None else type(self.lr_scheduler).__name__
        if saved == current or (saved == "an LR scheduler" and current is not None):
            return
        if current is None:
            problem = f"was saved with {saved} and this run has no lr_scheduler"
        elif saved is None:
            problem = f"was saved without an LR scheduler and this run has {current}"
        else:
            problem = f"was saved with {saved} and this run has {current}"
        raise ValueError(
            f"checkpoint {label} {problem}. Resume with the original lr_scheduler, start "
            "fresh (resume_from_checkpoint=null), or load only the model weights "
            "(docs/checkpoints.rst, 'Changing the setup')"
        )

    def _load_state(self, state: dict[str, Any]) -> None:
        super()._load_state(state)
        if self.lr_scheduler is None or "lr_scheduler" not in state:
            return
        saved = state.get("lr_scheduler_sized_for")
        if saved is not None and self._sized_for is not None and saved != self._sized_for:
            # The restored state fixes the schedule's length; stretching it silently would
            # change what the run means (and OneCycleLR would fail at its old end).
            raise ValueError(
                f"the LR schedule was sized for {saved} updates when this run started; "
                f"the resumed run asks for {self._sized_for} (epochs={self.epochs}, "
                f"{self.updates_per_epoch} updates per epoch). Resume with the original "
                "epochs and batch settings, or start a new run"
            )
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])  # type: ignore[union-attr]

    def _summary_lines(self) -> list[tuple[str, str]]:
        lines = super()._summary_lines()
        if self.lr_scheduler is not None:
            name = type(self.lr_scheduler).__name__
            lines.append(("lr schedule", f"{name}, stepped per {self.lr_scheduler_interval}"))
        return lines
