"""Code-free reading and writing of the files inside a checkpoint.

A checkpoint directory is untrusted input: anyone who can write to the bucket prefix
or the disk it lives on can replace a file. Python's pickle runs code while it loads,
so nothing here unpickles freely:

- the trainer's own state (progress, monitors, scheduler) is JSON, a format with no
  code in it at all;
- the files that hold tensors (optimizer, RNG states, ``checkpoint_objects``) are read
  with ``torch.load(weights_only=True)``, whose unpickler only rebuilds tensors,
  containers and numbers, and refuses every other type by name;
- Accelerate's own files are read the same way: by this package itself where it
  reads Accelerate's layout (:mod:`accel_hydra.checkpoint_reading`: the load is the
  check), or, where Accelerate loads them, checked first (memory-mapped, so their
  tensors are not read twice), whatever Accelerate's version does.

A type the safe loader refuses inside a user object's state is allowed the way torch
documents it, :func:`torch.serialization.add_safe_globals`, one type at a time; there
is no switch that trusts everything.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import re
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = [
    "UnsafeCheckpointError",
    "check_code_free",
    "check_stage_complete",
    "load_code_free",
    "load_object_state",
    "load_trainer_state",
    "pickle_capable_files",
    "save_object_state",
    "save_trainer_state",
]

# Files that never hold pickles: safetensors and JSON are code-free formats.
_CODE_FREE_SUFFIXES = (".safetensors", ".json")
# What Accelerate and this package write with torch.save (sharded FSDP states are not).
_TORCH_SAVE_SUFFIXES = (".bin", ".pt", ".pkl", ".pth")
# torch names the refused type as "Unsupported global: GLOBAL io.open was not ...".
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+) was not an allowed global")


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file would need code (a type outside the safe loader's list) to load.

    Attributes:
        path: the file refused.
        refused: the type the safe loader refused, when torch names it.
    """

    def __init__(self, message: str, path: str, refused: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.refused = refused


# ---------------------------------------------------------------- trainer state (JSON)


def save_trainer_state(state: dict[str, Any], path: str) -> None:
    """Write the trainer's own state as JSON.

    Plain values (numbers, strings, ``None``, lists, string-keyed dicts) are stored as
    they are; tuples, dicts with other keys and small tensors get a tagged form that
    :func:`load_trainer_state` turns back into the same Python values.
    """
    # dumps, not dump: dump streams through json's pure-Python encoder, dumps uses the C
    # one (the same text, written in one call; this runs once per checkpoint).
    text = json.dumps(_encode(state), sort_keys=True, allow_nan=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def load_trainer_state(path: str) -> dict[str, Any]:
    """Read a state written by :func:`save_trainer_state` (a legacy ``.pt`` one safely).

    Raises:
        ValueError: the file is not valid UTF-8 JSON holding an object, or a tag in it
            is malformed.
        UnsafeCheckpointError: a legacy ``.pt`` state needs code to load.
    """
    if path.endswith(".pt"):  # written by accel_hydra 0.1 before the JSON format
        state = _safe_torch_load(path, mmap=False)
    else:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            state = _decode(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError) as err:
            raise ValueError(
                f"{os.path.basename(path)} is not a valid trainer state: {err}"
            ) from err
    if not isinstance(state, dict):
        raise ValueError(
            f"{os.path.basename(path)} is not a valid trainer state: it holds a "
            f"{type(state).__name__}, not an object"
        )
    return state


def _encode(value: Any) -> Any:
    if isinstance(value, bool | int | str) or value is None:
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in value):
            return {k: _encode(v) for k, v in value.items()}
        return {"__items__": [[_encode(k), _encode(v)] for k, v in value.items()]}
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu()
        return {
            "__tensor__": {
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "shape": list(tensor.shape),
                "values": _encode(tensor.flatten().tolist()),
            }
        }
    if hasattr(value, "item") and callable(value.item):  # numpy scalars
        return _encode(value.item())
    raise TypeError(
        f"the trainer state holds a {type(value).__qualname__}, which JSON cannot store; "
        "keep _state_to_save() to numbers, strings, lists, dicts and small tensors"
    )


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, inner),) = value.items()
        if tag == "__float__":
            if inner not in ("inf", "-inf", "nan"):
                raise ValueError(f"bad float tag {inner!r}")
            return float(inner)
        if tag == "__tuple__":
            return tuple(_decode(v) for v in _expect(inner, list, tag))
        if tag == "__items__":
            return {_hashable(_decode(k)): _decode(v) for k, v in _expect(inner, list, tag)}
        if tag == "__tensor__":
            return _decode_tensor(_expect(inner, dict, tag))
    return {k: _decode(v) for k, v in value.items()}


def _decode_tensor(spec: dict[str, Any]) -> torch.Tensor:
    dtype = getattr(torch, str(spec["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"bad tensor dtype {spec['dtype']!r}")
    shape = [int(n) for n in _expect(spec["shape"], list, "shape")]
    return torch.tensor(_decode(spec["values"]), dtype=dtype).reshape(shape)


def _expect(value: Any, kind: type, tag: str) -> Any:
    if not isinstance(value, kind):
        raise ValueError(f"bad {tag} entry: expected a {kind.__name__}")
    return value


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


# ---------------------------------------------------------------- tensor files


def save_object_state(state: Any, path: str) -> None:
    """Write one ``checkpoint_objects`` state dict (tensors, numbers, containers)."""
    torch.save(state, path)


def load_object_state(path: str, owner: str) -> Any:
    """Read a state written by :func:`save_object_state` without running code.

    Args:
        path: the file.
        owner: how to name the object in an error (``checkpoint_objects[0] (EMA)``).

    Raises:
        UnsafeCheckpointError: the state holds a type the safe loader refuses; the
            message names it and how to allow it if the type is trusted.
    """
    try:
        return _safe_torch_load(path, mmap=False)
    except UnsafeCheckpointError as err:
        if err.refused is None:
            raise UnsafeCheckpointError(f"the state of {owner}: {err}", path) from err
        refused = err.refused
        raise UnsafeCheckpointError(
            f"the state of {owner} in {path} holds {refused}, which the safe loader "
            "(torch.load(weights_only=True)) refuses; if you trust that type, call "
            f"torch.serialization.add_safe_globals([{refused}]) before train(), or make "
            "its state_dict() return tensors, numbers and containers only",
            path,
            err.refused,
        ) from err


def pickle_capable_files(directory: str) -> list[str]:
    """Every file in ``directory`` (recursively) that is not in a code-free format."""
    found = []
    for dirpath, _, filenames in os.walk(directory):
        for filename in filenames:
            if not filename.endswith(_CODE_FREE_SUFFIXES):
                found.append(os.path.join(dirpath, filename))
    return sorted(found)


def check_code_free(path: str) -> None:
    """Check that ``path`` loads without running code, before anything else loads it.

    The file is memory-mapped, so its tensor bytes are not read here; only its pickle
    stream is walked by torch's restricted unpickler.

    Raises:
        UnsafeCheckpointError: it is not a torch zip archive, or its pickle names a type
            outside the safe list.
    """
    _safe_torch_load(path, mmap=True)


def load_code_free(path: str, map_location: Any = "cpu") -> Any:
    """Load a torch archive with the safe unpickler: the load and the code check in one.

    Where this package loads a pickle-capable file itself, the load is its check: the
    restricted unpickler refuses a forbidden type before building anything from it.

    Raises:
        UnsafeCheckpointError: as :func:`check_code_free`.
    """
    return _safe_torch_load(path, mmap=False, map_location=map_location)


def check_stage_complete(directory: str) -> None:
    """Check every torch archive of a freshly written stage ends with its zip directory.

    Some torch versions (2.6) do not raise when the disk fills (or a file-size limit
    hits) in the middle of ``torch.save``: the file is cut short and nothing says so.
    A zip archive's central directory is written last, so a cut-off one has none; this
    finds it before the checkpoint is committed, instead of at the next resume.

    Raises:
        OSError: naming the first file that was not written completely.
    """
    for path in pickle_capable_files(directory):
        if path.endswith(_TORCH_SAVE_SUFFIXES) and not zipfile.is_zipfile(path):
            raise OSError(
                f"{os.path.relpath(path, directory)} was not written completely (is the "
                "disk full?): it is not a whole torch archive; the checkpoint is not saved"
            )


def _safe_torch_load(path: str, mmap: bool, map_location: Any = "cpu") -> Any:
    if mmap:
        _check_torch_archive(path, path)
        return _restricted_load(path, path, map_location, mmap=True)
    with open(path, "rb") as f:  # one open for the format check and the load
        _check_torch_archive(f, path)
        f.seek(0)
        return _restricted_load(f, path, map_location, mmap=False)


def _check_torch_archive(source: Any, path: str) -> None:
    # torch.save writes zip archives; a bare pickle stream is only ever a forgery here,
    # and torch's legacy reader for it is the least reviewed path: never reach it.
    if not zipfile.is_zipfile(source):
        raise UnsafeCheckpointError(
            f"{os.path.basename(path)} is not a torch archive: refusing to unpickle it",
            path,
            None,
        )


def _restricted_load(source: Any, path: str, map_location: Any, mmap: bool) -> Any:
    try:
        with _accelerate_safe_globals():
            return torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        match = _REFUSED_GLOBAL.search(str(err))
        refused = match.group(1) if match else None
        what = f"type {refused}" if refused else "something the safe loader refuses"
        raise UnsafeCheckpointError(
            f"{os.path.basename(path)} needs {what} to load; refusing to run code from a "
            "checkpoint",
            path,
            refused,
        ) from None


@contextmanager
def _accelerate_safe_globals() -> Iterator[None]:
    """Allow the NumPy types Accelerate's RNG-state files hold, only while loading.

    They rebuild arrays of numbers (NumPy's generator state); Accelerate allows the
    same list when it loads them itself.
    """
    try:
        from accelerate.utils.other import TORCH_SAFE_GLOBALS
    except ImportError:  # an Accelerate without the list: allow nothing extra
        TORCH_SAFE_GLOBALS = []  # noqa: N806
    with torch.serialization.safe_globals(list(TORCH_SAFE_GLOBALS)):
        yield
