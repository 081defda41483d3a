"""Start a run from another run's model weights (``init_from``), then train fresh.

Only the weights are taken: no optimizer, schedule, step count or RNG, unlike
``resume_from_checkpoint``. The source is a checkpoint directory of this package, a
plain Accelerate ``save_state`` directory (what upstream AccelHydra writes), or a
single weights file, on local disk or behind any fsspec URL. Files are read without
running code: safetensors, or ``torch.load(weights_only=True)`` for ``.bin`` files.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

__all__ = [
    "WEIGHT_FILES",
    "read_weights_file",
    "InitFromError",
    "apply_init_from",
    "is_accelerate_checkpoint",
    "load_initial_weights",
]

#: Weight files of Accelerate's ``save_state`` (first model), most preferred first.
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")

_SHOWN = 3  # tensors named in a message before "and N more"


class InitFromError(ValueError):
    """The ``init_from`` weights cannot be loaded into the model."""


def is_accelerate_checkpoint(fs: Any, path: str) -> bool:
    """Whether ``path`` on ``fs`` holds the model weights of an Accelerate ``save_state``."""
    return any(fs.exists(f"{path.rstrip('/')}/{name}") for name in WEIGHT_FILES)


def apply_init_from(loop: Any) -> None:
    """Load ``loop.init_from`` into the loop's prepared model; say what was loaded.

    Every process reads the file itself, so no collective is needed.
    """
    model = loop.accelerator.unwrap_model(loop.model, keep_torch_compile=False)
    skipped = load_initial_weights(
        model,
        loop.init_from,
        strict=loop.init_strict,
        storage_options=getattr(loop, "storage_options", None),
    )
    if loop.accelerator.is_main_process:
        print("\n".join([f"accel_hydra: initial weights from {loop.init_from}", *skipped]))


def load_initial_weights(
    model: torch.nn.Module,
    source: str,
    *,
    strict: bool = True,
    storage_options: dict | None = None,
) -> list[str]:
    """Load the weights at ``source`` into ``model`` (unwrapped), in place.

    Args:
        model: the model (not wrapped by DDP; unwrap it first).
        source: a checkpoint directory, or a ``.safetensors`` / ``.bin`` file; a path or
            an fsspec URL.
        strict: refuse missing, unexpected or differently shaped tensors. With
            ``False`` they are skipped and listed in the returned lines.
        storage_options: fsspec options for a URL (credentials, endpoint).

    Returns:
        Lines describing what was skipped (empty when everything matched).

    Raises:
        InitFromError: no weights at ``source``, or (``strict``) they do not fit.
    """
    state = _read_state_dict(source, storage_options or {})
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{key} {list(state[key].shape)} vs model {list(own[key].shape)}"
        for key in sorted(set(own) & set(state))
        if state[key].shape != own[key].shape
    ]
    problems = [
        (label, items)
        for label, items in (
            ("shape mismatch", mismatched),
            ("missing in the checkpoint", missing),
            ("not in the model", unexpected),
        )
        if items
    ]
    if problems and strict:
        detail = "; ".join(f"{len(items)} {label}: {_first(items)}" for label, items in problems)
        raise InitFromError(
            f"init_from {source}: the weights do not fit the model ({detail}); fix the model "
            "config, or set init_strict=false to load only the tensors that fit"
        )
    bad = {item.split(" ", 1)[0] for item in mismatched}
    fitting = {k: v for k, v in state.items() if k in own and k not in bad}
    model.load_state_dict(fitting, strict=False)
    return [
        f"init_from: skipped {len(items)} {label}: {_first(items)}" for label, items in problems
    ]


def _first(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown if len(items) <= _SHOWN else f"{shown} and {len(items) - _SHOWN} more"


def _read_state_dict(source: str, storage_options: dict) -> dict[str, torch.Tensor]:
    import fsspec

    fs, path = fsspec.core.url_to_fs(str(source), **storage_options)
    if fs.isdir(path):
        found = [f"{path.rstrip('/')}/{n}" for n in WEIGHT_FILES if fs.exists(f"{path}/{n}")]
        if not found:
            raise InitFromError(
                f"init_from {source}: no {' or '.join(WEIGHT_FILES)} there; give a checkpoint "
                "directory (this package's or Accelerate's save_state) or a weights file"
            )
        path = found[0]
    elif not fs.exists(path):
        raise InitFromError(f"init_from {source}: not found; check the path or URL")
    if not path.endswith((".safetensors", ".bin", ".pt", ".pth")):
        raise InitFromError(
            f"init_from {source}: expected a .safetensors or .bin weights file, got {path}"
        )
    with tempfile.TemporaryDirectory() as tmp:
        local = path
        if not _is_local(fs):
            local = os.path.join(tmp, os.path.basename(path))
            fs.get_file(path, local)
        try:
            state = read_weights_file(local)
        except Exception as err:
            raise InitFromError(f"init_from {source}: cannot read {path} ({err})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InitFromError(f"init_from {source}: {path} is not a state dict of tensors")
    return state


def read_weights_file(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a local weights file, read without running code: safetensors, or
    a torch archive through ``weights_only=True``. Errors are the readers' own."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    return torch.load(path, map_location="cpu", weights_only=True)


def _is_local(fs: Any) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")
