"""A checkpoint's state copied into host memory, then written in Accelerate's layout.

An asynchronous save splits ``accelerator.save_state`` in two. On the training thread,
:func:`take_snapshot` copies everything a checkpoint holds (weights, optimizer,
scheduler, gradient scaler, sampler, RNG states, ``checkpoint_objects``, the trainer's
state) into host tensors: a memory copy, the least a consistent save can cost. On a
background thread, :func:`write_snapshot` serializes that copy into the very files
``save_state`` writes (``model.safetensors``, ``optimizer.bin``,
``random_states_<rank>.pkl``...), through Accelerate's own ``save``, so resume,
``init_from`` and the commit protocol do not know how a checkpoint was written.

The host tensors are kept by :class:`HostBuffers` and reused by the next save (page
faults on fresh memory cost as much as the copy itself), pinned when the state lives
on a GPU, where the copies are queued on the current stream without waiting: the
writer waits for them (an event) before it reads a byte, while the training thread
goes on and its next kernels, queued after the copies, cannot change what is copied.

Only layouts whose state one process holds whole are copied this way
(:func:`snapshot_is_exact`): FSDP, DeepSpeed and Megatron gather or shard their
state through collectives, which must not run on a background thread.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from accelerate.utils import DistributedType
from accelerate.utils import save as accelerate_save
from accelerate.utils.constants import (
    OPTIMIZER_NAME,
    RNG_STATE_NAME,
    SAFE_WEIGHTS_NAME,
    SAMPLER_NAME,
    SCALER_NAME,
    SCHEDULER_NAME,
    WEIGHTS_NAME,
)
from safetensors.torch import save_file as save_safetensors

from accel_hydra.safe_state import save_object_state, save_trainer_state

__all__ = [
    "PAUSE_SAVE_ENV",
    "HostBuffers",
    "HostSnapshot",
    "snapshot_is_exact",
    "take_snapshot",
    "write_snapshot",
]

#: Test hook: ``<phase>@<checkpoint name>`` (phases ``snapshot``, ``serialization``,
#: ``marker``) makes that save write the file named by ``ACCEL_HYDRA_PAUSE_SAVE_FILE``
#: and sleep there, so a test can kill the process at a known moment of the save.
PAUSE_SAVE_ENV = "ACCEL_HYDRA_PAUSE_SAVE"

_EXACT_LAYOUTS = {DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU}


def snapshot_is_exact(accelerator: Any) -> str | None:
    """Why this accelerator's state cannot be saved from a host snapshot, or None.

    The snapshot reproduces ``save_state`` for one process holding its state whole
    (one device, or DDP on CPUs or GPUs) and Accelerate's plain defaults.
    """
    layout = accelerator.distributed_type
    if layout not in _EXACT_LAYOUTS:
        return f"{layout.value} gathers its state through collectives"
    if accelerator._custom_objects:
        return "objects registered with accelerator.register_for_checkpointing"
    if accelerator._save_model_state_pre_hook:
        return "a save_state pre-hook is registered"
    if accelerator.project_configuration.automatic_checkpoint_naming:
        return "automatic_checkpoint_naming is on"
    if accelerator.device.type not in ("cpu", "cuda"):
        return f"the RNG state of {accelerator.device.type} devices"
    return None


class HostBuffers:
    """Host tensors that receive the state, reused from one save to the next.

    A buffer is matched to a tensor by its position in the state, and replaced only
    when the shape or dtype there changed: steady training reuses every one.
    """

    def __init__(self) -> None:
        self._buffers: list[torch.Tensor] = []
        self._next = 0
        self._copied: dict[tuple, torch.Tensor] = {}
        self.on_gpu = False
        self._reserving: threading.Thread | None = None
        self._reserved: list[torch.Tensor] = []

    def start(self) -> None:
        """Begin a new snapshot: buffers are handed out from the first again."""
        if self._reserving is not None:  # never copy into a buffer still being faulted in
            self._reserving.join()
            self._reserving = None
            if not self._buffers:
                self._buffers = self._reserved
            self._reserved = []
        self._next = 0
        self._copied = {}
        self.on_gpu = False

    def reserve(self, snapshot: Callable[[HostBuffers], Any]) -> None:
        """Allocate and fault in, on a background thread, the buffers a snapshot will use.

        The first save would otherwise pay for fresh host memory on the training
        thread: a page fault per 4 KiB (pinning, on a GPU), several times the copy
        itself. ``snapshot(buffers)`` is called here with a planning stand-in that
        records each tensor's shape, dtype and place in order instead of copying it
        (``take_snapshot`` with the arguments of a real save); a thread then allocates
        and touches the buffers while training goes on. The next :meth:`start` waits
        for it. If it fails, nothing is lost: the save allocates as before.
        """
        if self._buffers or self._reserving is not None:
            return
        planner = _BufferPlan()
        snapshot(planner)
        specs = planner.specs

        def allocate() -> None:
            buffers = []
            for shape, dtype, pinned in specs:
                buffer = self._allocate_spec(shape, dtype, pinned)
                buffer.zero_()  # touch every page now, not in the first save
                buffers.append(buffer)
            self._reserved = buffers

        self._reserving = threading.Thread(
            target=_quietly(allocate), name="accel_hydra host buffers", daemon=True
        )
        self._reserving.start()

    def copy(self, value: Any) -> Any:
        """``value`` with every tensor replaced by a host copy; containers rebuilt."""
        if isinstance(value, torch.Tensor):
            return self._tensor(value)
        if isinstance(value, dict):
            copied = type(value)((key, self.copy(item)) for key, item in value.items())
            metadata = getattr(value, "_metadata", None)
            if metadata is not None:  # a module's state_dict: versions of its modules
                copied._metadata = copy.deepcopy(metadata)  # type: ignore[attr-defined]
            return copied
        if isinstance(value, list | tuple) and not hasattr(value, "_fields"):
            return type(value)(self.copy(item) for item in value)
        return copy.deepcopy(value)

    def _tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        # Tensors sharing storage (tied weights) stay shared, so safetensors drops the
        # duplicates exactly as it does for the live state.
        key = _storage_key(tensor)
        if key in self._copied:
            return self._copied[key]
        on_gpu = tensor.device.type == "cuda"
        if self._next < len(self._buffers):
            buffer = self._buffers[self._next]
            if (
                buffer.shape != tensor.shape
                or buffer.dtype != tensor.dtype
                or buffer.is_pinned() != on_gpu
            ):
                buffer = self._allocate(tensor, on_gpu)
                self._buffers[self._next] = buffer
        else:
            buffer = self._allocate(tensor, on_gpu)
            self._buffers.append(buffer)
        self._next += 1
        buffer.copy_(tensor.detach(), non_blocking=on_gpu)
        self.on_gpu = self.on_gpu or on_gpu
        self._copied[key] = buffer
        return buffer

    @staticmethod
    def _allocate(tensor: torch.Tensor, pinned: bool) -> torch.Tensor:
        return HostBuffers._allocate_spec(tensor.shape, tensor.dtype, pinned)

    @staticmethod
    def _allocate_spec(shape: Any, dtype: torch.dtype, pinned: bool) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device="cpu", pin_memory=pinned)

    @property
    def nbytes(self) -> int:
        """Host memory the buffers hold: what asynchronous saves cost."""
        return sum(buffer.nbytes for buffer in self._buffers)


class _BufferPlan(HostBuffers):
    """Walks a state like :class:`HostBuffers` and records the buffers it would take."""

    def __init__(self) -> None:
        super().__init__()
        self.specs: list[tuple[Any, torch.dtype, bool]] = []

    def _tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key not in self._copied:
            self._copied[key] = tensor
            self.specs.append((tensor.shape, tensor.dtype, tensor.device.type == "cuda"))
        return tensor


def _storage_key(tensor: torch.Tensor) -> tuple:
    """Equal for tensors that are views of the same memory in the same way (tied weights)."""
    return (
        tensor.device,
        tensor.untyped_storage().data_ptr(),
        tensor.storage_offset(),
        tuple(tensor.shape),
        tensor.stride(),
        tensor.dtype,
    )


def _quietly(work: Callable[[], None]) -> Callable[[], None]:
    """``work`` whose failure (no memory to spare, say) only means no reserved buffers."""

    def run() -> None:
        with contextlib.suppress(Exception):
            work()

    return run


@dataclass
class HostSnapshot:
    """Everything one process writes into a checkpoint, in host memory.

    ``files`` maps a file name to what goes in it and how: ``"safetensors"`` (weights,
    through Accelerate's ``save`` which drops tied duplicates), ``"torch"`` (Accelerate's
    pickled states, written by the main process), ``"torch_local"`` (this process's own
    file, the RNG states), ``"tensors"`` (an extra tensor file), ``"object"`` and
    ``"trainer"`` (accel_hydra's own safe formats).
    """

    files: dict[str, tuple[str, Any]] = field(default_factory=dict)
    ready: Any = None  # a CUDA event the host copies are done at, when the state is on a GPU


def take_snapshot(
    accelerator: Any,
    buffers: HostBuffers,
    objects: list[Any],
    trainer_state: dict[str, Any] | None,
    tensor_files: dict[str, dict[str, torch.Tensor]] | None = None,
    safe_serialization: bool = True,
) -> HostSnapshot:
    """Copy the state ``accelerator.save_state`` would write, and ours, into host memory.

    Call on the training thread, where ``save_state`` would be called: the RNG states
    are read now, the optimizer's and the model's tensors copied now.

    Args:
        accelerator: the run's Accelerator (see :func:`snapshot_is_exact`).
        buffers: host tensors of the previous save, reused.
        objects: states of ``checkpoint_objects`` (``state_dict()``), main process only.
        trainer_state: the trainer's JSON state, main process only (else None).
        tensor_files: extra tensor files, ``{file_stem: {name: tensor}}``.
        safe_serialization: weights as safetensors (``save_state``'s default).
    """
    buffers.start()
    files: dict[str, tuple[str, Any]] = {}
    weights_name = SAFE_WEIGHTS_NAME if safe_serialization else WEIGHTS_NAME
    for i, model in enumerate(accelerator._models):
        name = weights_name if i == 0 else weights_name.replace(".", f"_{i}.")
        state = buffers.copy(accelerator.get_state_dict(model, unwrap=False))
        files[name] = ("safetensors" if safe_serialization else "torch", state)
    for i, optimizer in enumerate(accelerator._optimizers):
        name = f"{OPTIMIZER_NAME}.bin" if i == 0 else f"{OPTIMIZER_NAME}_{i}.bin"
        files[name] = ("torch", buffers.copy(optimizer.state_dict()))
    for i, scheduler in enumerate(accelerator._schedulers):
        name = f"{SCHEDULER_NAME}.bin" if i == 0 else f"{SCHEDULER_NAME}_{i}.bin"
        files[name] = ("torch", buffers.copy(scheduler.state_dict()))
    for i, dataloader in enumerate(accelerator._dataloaders):
        files.update(_dataloader_files(i, dataloader, buffers))
    if accelerator.scaler is not None:
        files[SCALER_NAME] = ("torch_all", buffers.copy(accelerator.scaler.state_dict()))
    rng_name = f"{RNG_STATE_NAME}_{accelerator.state.process_index}.pkl"
    files[rng_name] = ("torch_all", _rng_states(accelerator.step))
    for stem, tensors in (tensor_files or {}).items():
        files[f"{stem}.safetensors"] = ("tensors", buffers.copy(dict(tensors)))
    for index, state in enumerate(objects):
        files[f"accel_hydra_object_{index}.pt"] = ("object", buffers.copy(state))
    if trainer_state is not None:
        files["accel_hydra_trainer_state.json"] = ("trainer", buffers.copy(trainer_state))
    ready = None
    if buffers.on_gpu:
        ready = torch.cuda.Event()
        ready.record()
    return HostSnapshot(files=files, ready=ready)


def _dataloader_files(index: int, dataloader: Any, buffers: HostBuffers) -> dict:
    """The sampler and stateful-loader files ``save_state`` writes for one dataloader."""
    from accelerate.data_loader import IterableDatasetShard, SeedableRandomSampler

    files: dict[str, tuple[str, Any]] = {}
    if isinstance(dataloader.dataset, IterableDatasetShard):
        sampler = dataloader.get_sampler()
        if isinstance(sampler, SeedableRandomSampler):
            name = f"{SAMPLER_NAME}.bin" if index == 0 else f"{SAMPLER_NAME}_{index}.bin"
            kept = copy.copy(sampler)
            if getattr(sampler, "generator", None) is not None:
                # Its generator moves on with training; the saved one must not.
                kept.generator = torch.Generator().set_state(sampler.generator.get_state())
            files[name] = ("torch", kept)
    if getattr(dataloader, "use_stateful_dataloader", False):
        name = "dl_state_dict.bin" if index == 0 else f"dl_state_dict_{index}.bin"
        files[name] = ("torch_all", buffers.copy(dataloader.state_dict()))
    return files


def _rng_states(step: int) -> dict[str, Any]:
    """The RNG states ``save_state`` records, with the same keys."""
    states: dict[str, Any] = {
        "step": step,
        "random_state": random.getstate(),
        "numpy_random_seed": np.random.get_state(),
        "torch_manual_seed": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["torch_cuda_manual_seed"] = torch.cuda.get_rng_state_all()
    return states


def write_snapshot(
    snapshot: HostSnapshot,
    directory: str,
    on_file: Callable[[str], None] | None = None,
) -> None:
    """Write ``snapshot`` into ``directory`` as ``save_state`` and the mixin would.

    Runs on the background thread. ``on_file`` is told each file written (progress,
    so a long write is not mistaken for a stalled one; and the test pause).
    """
    if snapshot.ready is not None:
        snapshot.ready.synchronize()
    os.makedirs(directory, exist_ok=True)
    for name, (kind, state) in snapshot.files.items():
        path = os.path.join(directory, name)
        if kind == "safetensors":
            accelerate_save(state, path, safe_serialization=True)
        elif kind == "torch":
            accelerate_save(state, path)  # the main process writes it, as save_state does
        elif kind == "torch_all":
            torch.save(state, path)
        elif kind == "tensors":
            save_safetensors(state, path)
        elif kind == "object":
            save_object_state(state, path)
        else:
            save_trainer_state(state, path)
        if on_file is not None:
            on_file(name)


def pause_for_test(phase: str, name: str) -> None:
    """Stop here forever when the test hook :data:`PAUSE_SAVE_ENV` names this moment."""
    if os.environ.get(PAUSE_SAVE_ENV) != f"{phase}@{name}":
        return
    flag = os.environ.get("ACCEL_HYDRA_PAUSE_SAVE_FILE")
    if flag:
        with open(flag, "w") as f:
            f.write(str(os.getpid()))
    while True:
        time.sleep(0.05)
