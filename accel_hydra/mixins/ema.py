"""EMAMixin: an exponential moving average of the weights, kept beside the model."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from accel_hydra.loop import LoopBase

__all__ = ["EMAMixin", "EMA_FILE_STEM"]

#: The stem of the EMA's file in every checkpoint: ``ema.safetensors``.
EMA_FILE_STEM = "ema"


@dataclass(kw_only=True, eq=False)
class EMAMixin(LoopBase):
    """Keep an exponential moving average (EMA) of the model's weights during training.

    After every ``ema_every_n_steps``-th optimizer update the shadow weights move toward
    the model's: ``ema = ema_decay * ema + (1 - ema_decay) * weights``, for every floating
    parameter and buffer of the unwrapped (uncompiled) model. The update is one fused
    ``torch._foreach_lerp_`` on the device: nothing is read on the host, and whether
    an update blends depends only on the step count. Until ``ema_start_step`` the
    shadow copies the weights instead, so the average starts from the weights of that
    update rather than from the random initialisation.

    Every checkpoint holds the average as ``ema.safetensors`` (keys as in the model's
    ``state_dict``; integer buffers such as BatchNorm's counters are stored as they are
    in the model), restored bitwise on resume. In ``best`` that file is the EMA weights
    file of the best model: load it with ``safetensors.torch.load_file`` and
    ``model.load_state_dict``, or start a run from it with ``init_from``.

    Args:
        ema_decay: how much of the average survives each blend, in ``[0, 1]``.
        ema_every_n_steps: blend after every this many optimizer updates.
        ema_start_step: updates until which the average copies the weights.
        validate_with_ema: validate (the sanity pass too) with the averaged weights
            swapped into the model; the training weights are put back bitwise after.

    Example::

        @dataclass(kw_only=True)
        class EMATrainer(EMAMixin, Trainer):
            ...

        trainer = EMATrainer(..., ema_decay=0.999, validate_with_ema=True)
    """

    ema_decay: float = 0.999
    ema_every_n_steps: int = 1
    ema_start_step: int = 0
    validate_with_ema: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.ema_every_n_steps < 1:
            raise ValueError(f"ema_every_n_steps must be >= 1, got {self.ema_every_n_steps}")
        if self.ema_start_step < 0:
            raise ValueError(f"ema_start_step must be >= 0, got {self.ema_start_step}")
        self._ema_names: list[str] = []
        self._ema_live: list[torch.Tensor] = []
        self._ema_shadow: list[torch.Tensor] = []
        self._ema_fixed: dict[str, torch.Tensor] = {}

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged weights, keyed like the model's ``state_dict`` (live tensors:
        copy them to keep a snapshot)."""
        return {**self._ema_fixed, **dict(zip(self._ema_names, self._ema_shadow, strict=True))}

    def _after_prepare(self) -> None:
        super()._after_prepare()
        model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
        self._ema_names, self._ema_live, self._ema_fixed = [], [], {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            if tensor.is_floating_point():
                self._ema_names.append(name)
                # Detached views share the weights' storage: the optimizer's in-place
                # updates show through, and swapping values in writes the model.
                self._ema_live.append(tensor.detach())
            else:
                self._ema_fixed[name] = tensor.detach()
        self._ema_shadow = [t.clone() for t in self._ema_live]

    def _after_optimizer_step(self) -> None:
        super()._after_optimizer_step()
        if self._optimizer_step_was_skipped():
            return  # the weights did not change (fp16 overflow): neither does the average
        step = self.progress.step
        if step <= self.ema_start_step:
            torch._foreach_copy_(self._ema_shadow, self._ema_live)
        elif step % self.ema_every_n_steps == 0:
            torch._foreach_lerp_(self._ema_shadow, self._ema_live, 1.0 - self.ema_decay)

    @contextlib.contextmanager
    def _validation_context(self) -> Iterator[None]:
        with super()._validation_context():
            if not self.validate_with_ema:
                yield
                return
            kept = [t.clone() for t in self._ema_live]
            with torch.no_grad():
                torch._foreach_copy_(self._ema_live, self._ema_shadow)
            try:
                yield
            finally:
                with torch.no_grad():
                    torch._foreach_copy_(self._ema_live, kept)

    def _tensors_to_save(self) -> dict[str, dict[str, torch.Tensor]]:
        files = super()._tensors_to_save()
        files[EMA_FILE_STEM] = self.ema_state_dict()
        return files

    def _load_tensors(self, files: dict[str, dict[str, torch.Tensor]]) -> None:
        super()._load_tensors(files)
        saved = files.get(EMA_FILE_STEM)
        if saved is None:
            # A checkpoint from before EMAMixin was added: average from here on.
            torch._foreach_copy_(self._ema_shadow, self._ema_live)
            self._say(
                "accel_hydra: the checkpoint holds no EMA weights; the EMA starts from its weights"
            )
            return
        self._check_saved(saved)
        with torch.no_grad():
            for name, shadow in zip(self._ema_names, self._ema_shadow, strict=True):
                shadow.copy_(saved[name])  # from the CPU to the model's device, once

    def _check_saved(self, saved: dict[str, Any]) -> None:
        missing = sorted(set(self._ema_names) - set(saved))
        wrong = [
            name
            for name, shadow in zip(self._ema_names, self._ema_shadow, strict=True)
            if name in saved and tuple(saved[name].shape) != tuple(shadow.shape)
        ]
        if missing or wrong:
            raise ValueError(
                f"the checkpoint's {EMA_FILE_STEM}.safetensors does not fit this model "
                f"(missing {missing[:5]}, other shapes {wrong[:5]}); resume with the model "
                "that saved it, or start the EMA fresh from a checkpoint without it"
            )

    def _summary_lines(self) -> list[tuple[str, str]]:
        lines = super()._summary_lines()
        used = ", validation uses it" if self.validate_with_ema else ""
        lines.append(
            (
                "weight EMA",
                f"decay {self.ema_decay} every {self.ema_every_n_steps} update(s) "
                f"from update {self.ema_start_step}{used}",
            )
        )
        return lines
