"""GradClipMixin: bound gradients before each optimizer update."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from accel_hydra.loop import LoopBase

__all__ = ["GradClipMixin"]


@dataclass(kw_only=True, eq=False)
class GradClipMixin(LoopBase):
    """Clip gradients through the accelerator, once per optimizer update.

    Clipping goes through ``accelerator.clip_grad_norm_`` / ``clip_grad_value_``, so
    mixed-precision gradients are unscaled first and sharded models clip the global
    norm.

    Args:
        max_grad_norm: clip the global L2 norm of all gradients to this value.
        clip_grad_value: clamp every gradient element to ``[-value, value]``.

    Attributes:
        last_grad_norm: the total gradient norm before clipping, as a tensor (no
            device sync), from the last update; ``None`` unless ``max_grad_norm`` is set.
    """

    max_grad_norm: float | None = None
    clip_grad_value: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("max_grad_norm", "clip_grad_value"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be > 0 or None, got {value}")

    def _before_optimizer_step(self) -> None:
        super()._before_optimizer_step()
        if self.direct_updates:  # no grad scaler, no shards: what Accelerate would call
            clip_value, clip_norm = torch.nn.utils.clip_grad_value_, torch.nn.utils.clip_grad_norm_
        else:
            clip_value = self.accelerator.clip_grad_value_
            clip_norm = self.accelerator.clip_grad_norm_
        if self.clip_grad_value is not None:
            clip_value(self.model.parameters(), self.clip_grad_value)
        if self.max_grad_norm is not None:
            self.last_grad_norm = clip_norm(self.model.parameters(), self.max_grad_norm)
