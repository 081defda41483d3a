"""Accelerate's checkpoint files read back by the loop itself: each file once.

A resume used to pass over a checkpoint three times: the checksum of every file, a
dry run of the safe unpickler over every pickle-capable file (so that no code runs),
then ``accelerator.load_state``, which opens every file again. For the layouts whose
state one process holds whole (the ones :mod:`accel_hydra.host_snapshot` writes) the
loop reads Accelerate's files itself, in two steps:

* :func:`read_checkpoint` loads every pickle-capable file (optimizer, scheduler,
  gradient scaler, RNG states) once, with ``torch.load(weights_only=True)``: that load
  is also the code check. It only parses: nothing in the run changes, so the caller
  computes the checksums on other threads meanwhile (xxhash releases the GIL) and
  throws the result away if one does not match.
* :func:`apply_checkpoint`, called once every checksum matched, hands the parsed
  states to the optimizer, scheduler, scaler and RNGs and reads the weights with
  safetensors (memory-mapped, straight onto the device when asked), exactly as
  ``load_state`` does.

A damaged or forged checkpoint therefore changes nothing in the run, and a good one
costs one read per file plus checksums that run beside it. Elsewhere (FSDP,
DeepSpeed, Megatron, objects registered with Accelerate, ``load_state`` hooks,
stateful or iterable-dataset loaders) :func:`reads_exactly` says why, and
``load_state`` does the work.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate.utils.constants import (
    OPTIMIZER_NAME,
    RNG_STATE_NAME,
    SAFE_WEIGHTS_NAME,
    SCALER_NAME,
    SCHEDULER_NAME,
    WEIGHTS_NAME,
)
from safetensors.torch import load_model as load_safetensors_model

from accel_hydra.host_snapshot import snapshot_is_exact
from accel_hydra.safe_state import load_code_free

__all__ = [
    "ReadCheckpoint",
    "apply_checkpoint",
    "load_location",
    "read_checkpoint",
    "reads_exactly",
]

_CUSTOM_CHECKPOINT = re.compile(r"^custom_checkpoint_\d+\.pkl$")


def reads_exactly(accelerator: Any, directory: str) -> str | None:
    """Why ``load_state`` must load ``directory`` for this accelerator, or None.

    The same layouts as an asynchronous save (:func:`snapshot_is_exact`), no
    ``load_state`` pre-hook, no dataloader whose state Accelerate keeps in a file of
    its own, and no ``custom_checkpoint_<n>.pkl`` in the directory (``load_state``
    refuses a count that differs from the registered objects; let it say so).
    """
    reason = snapshot_is_exact(accelerator)
    if reason is not None:
        return reason
    if accelerator._load_model_state_pre_hook:
        return "a load_state pre-hook is registered"
    from accelerate.data_loader import IterableDatasetShard

    for dataloader in accelerator._dataloaders:
        if getattr(dataloader, "use_stateful_dataloader", False):
            return "a stateful dataloader"
        if isinstance(getattr(dataloader, "dataset", None), IterableDatasetShard):
            return "an iterable dataset's sampler"
    if any(_CUSTOM_CHECKPOINT.match(name) for name in os.listdir(directory)):
        return "the checkpoint holds custom_checkpoint files"
    return None


@dataclass
class ReadCheckpoint:
    """The parsed pickle-capable files of one checkpoint directory, not applied yet."""

    directory: str
    map_location: Any
    states: dict[str, Any] = field(default_factory=dict)

    @property
    def files(self) -> set[str]:
        """Names of the files read (and so checked for code) here."""
        return set(self.states)


def load_location(accelerator: Any, on_device: bool) -> Any:
    """Where optimizer states go: ``load_state``'s rule (its device with several
    processes on several devices, else the CPU), or the device when asked."""
    if on_device or (accelerator.num_processes > 1 and accelerator.device.type != "cpu"):
        return accelerator.device
    return "cpu"


def read_checkpoint(accelerator: Any, directory: str, on_device: bool = False) -> ReadCheckpoint:
    """Parse the pickle-capable files ``load_state`` would read from ``directory``.

    Nothing in the run changes. A missing optimizer or scheduler file raises
    ``FileNotFoundError`` as ``load_state`` does; a missing RNG file is skipped, as
    ``load_state`` skips it.

    Raises:
        UnsafeCheckpointError: a file needs code to load.
    """
    read = ReadCheckpoint(directory, load_location(accelerator, on_device))
    for i, _ in enumerate(accelerator._models):
        if not os.path.exists(_path(directory, _weights_file(SAFE_WEIGHTS_NAME, i))):
            name = _weights_file(WEIGHTS_NAME, i)
            read.states[name] = load_code_free(_path(directory, name), read.map_location)
    for i, _ in enumerate(accelerator._optimizers):
        name = f"{OPTIMIZER_NAME}.bin" if i == 0 else f"{OPTIMIZER_NAME}_{i}.bin"
        read.states[name] = load_code_free(_path(directory, name), read.map_location)
    for i, _ in enumerate(accelerator._schedulers):
        name = f"{SCHEDULER_NAME}.bin" if i == 0 else f"{SCHEDULER_NAME}_{i}.bin"
        read.states[name] = load_code_free(_path(directory, name), None)
    if accelerator.scaler is not None:
        read.states[SCALER_NAME] = load_code_free(_path(directory, SCALER_NAME), None)
    rng_name = f"{RNG_STATE_NAME}_{accelerator.state.process_index}.pkl"
    if os.path.exists(_path(directory, rng_name)):
        read.states[rng_name] = load_code_free(_path(directory, rng_name), None)
    return read


def apply_checkpoint(accelerator: Any, read: ReadCheckpoint) -> None:
    """Load ``read`` into the run, in ``load_state``'s order and with its results."""
    device = str(read.map_location)
    for i, model in enumerate(accelerator._models):
        name = _weights_file(WEIGHTS_NAME, i)
        if name in read.states:
            model.load_state_dict(read.states[name])
        else:
            path = _path(read.directory, _weights_file(SAFE_WEIGHTS_NAME, i))
            load_safetensors_model(model, path, device=device)
    for i, optimizer in enumerate(accelerator._optimizers):
        name = f"{OPTIMIZER_NAME}.bin" if i == 0 else f"{OPTIMIZER_NAME}_{i}.bin"
        optimizer.load_state_dict(read.states[name])
    for i, scheduler in enumerate(accelerator._schedulers):
        name = f"{SCHEDULER_NAME}.bin" if i == 0 else f"{SCHEDULER_NAME}_{i}.bin"
        scheduler.load_state_dict(read.states[name])
    if accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(read.states[SCALER_NAME])
    states = read.states.get(f"{RNG_STATE_NAME}_{accelerator.state.process_index}.pkl")
    if states is not None:
        _set_rng_states(accelerator, states)


def _set_rng_states(accelerator: Any, states: Any) -> None:
    # As load_state: each generator in turn, and a state that does not fit (another
    # number of GPUs) stops there silently, keeping those already set.
    try:
        if "step" in states:
            accelerator.step = states["step"]
        random.setstate(states["random_state"])
        np.random.set_state(states["numpy_random_seed"])
        torch.set_rng_state(states["torch_manual_seed"])
        if torch.cuda.is_available():
            torch.cuda.set_rng_state_all(states["torch_cuda_manual_seed"])
    except Exception:  # noqa: S110 - load_state's own behaviour, kept on purpose
        pass


def _weights_file(base: str, index: int) -> str:
    return base if index == 0 else base.replace(".", f"_{index}.")


def _path(directory: str, name: str) -> str:
    return os.path.join(directory, name)
