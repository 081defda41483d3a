"""The commit marker: its format, and its validation as untrusted input.

A checkpoint directory is committed once it holds :data:`MARKER`, a small JSON record
of its progress (``step``, ``epoch``, ``batches_in_epoch``) and of every other file in
it: relative name -> ``{"size": bytes, "hash": checksum}``. Whoever can write to the
checkpoint directory (a shared bucket prefix, a copied folder) can write the marker
too, so :func:`parse_marker` treats it like input from the internet: every field has
one type and a bound, every file name is a plain relative name inside the checkpoint
directory, and anything else is a :class:`MarkerError` naming what is wrong. Callers
turn that into a *damaged* checkpoint: skipped, never a crash.
"""

from __future__ import annotations

import json
import re
from typing import Any

from accel_hydra.checksums import CHECKSUM, CHECKSUM_HEX_DIGITS

__all__ = [
    "MARKER",
    "MARKER_MAX_BYTES",
    "MarkerError",
    "check_checkpoint_name",
    "check_relative_name",
    "marker_bytes",
    "parse_marker",
]

#: File whose presence makes a checkpoint directory committed. Holds its progress record.
MARKER = "accel_hydra_committed.json"
#: A marker larger than this is damaged (about 100 bytes per file: room for ~100k files).
MARKER_MAX_BYTES = 16 * 2**20

# Accelerate writes flat names, and directories of flat names for sharded FSDP and
# DeepSpeed states (``pytorch_model_fsdp_0/__0_0.distcp``, ``.metadata``). A whitelist
# of characters keeps out separators of any OS, drive letters, NUL and control bytes.
_PART = re.compile(r"[A-Za-z0-9_.+=@-]{1,255}")
_MAX_DEPTH = 8
_MAX_FILES = 100_000
# Far above any real run (2**50 updates, 1 PiB files), far below what breaks arithmetic.
_MAX_COUNT = 2**50
_MAX_SIZE = 2**50
_PROGRESS = ("step", "epoch", "batches_in_epoch")
_EXTRA_MAX_CHARS = 1000


class MarkerError(ValueError):
    """A commit marker that is not one this library would write; the message says why."""


def check_checkpoint_name(name: str) -> None:
    """Raise :class:`MarkerError` unless ``name`` is one plain path component.

    Checkpoint names become local directory names (the fetch cache, the stage), so
    ``..``, ``.`` and anything with a separator are refused.
    """
    if not isinstance(name, str) or not _PART.fullmatch(name) or name in (".", ".."):
        raise MarkerError(
            f"checkpoint name {name!r} is not a plain name (letters, digits, '_.+=@-')"
        )


def check_relative_name(rel: Any) -> None:
    """Raise :class:`MarkerError` unless ``rel`` is a plain relative file name.

    Allowed: ``/``-separated parts of letters, digits and ``_.+=@-``, none of them
    ``.`` or ``..``, at most 8 deep, and not the marker itself.
    """
    if not isinstance(rel, str):
        raise MarkerError(f"file name {rel!r} is not a string")
    parts = rel.split("/")
    if len(parts) > _MAX_DEPTH or any(
        not _PART.fullmatch(part) or part in (".", "..") for part in parts
    ):
        raise MarkerError(
            f"file name {rel[:200]!r} is not a plain relative name inside the checkpoint"
        )
    if rel == MARKER:
        raise MarkerError(f"the marker lists itself ({MARKER}) as a file")


def marker_bytes(info: dict[str, Any], files: dict[str, dict[str, Any]]) -> bytes:
    """The marker for progress record ``info`` and file records ``files``.

    Raises:
        MarkerError: the record would not pass :func:`parse_marker` (a bug of the
            caller: a marker is never written that a reader would call damaged).
    """
    raw = json.dumps({**info, "checksum": CHECKSUM, "files": files}, sort_keys=True).encode()
    parse_marker(raw)
    return raw


def parse_marker(raw: bytes) -> dict[str, Any]:
    """The validated record of a marker's bytes.

    Returns:
        ``step``, ``epoch``, ``batches_in_epoch`` (ints; 0 when absent), ``checksum``,
        ``files`` (relative name -> ``{"size": int, "hash": str}``) and any extra
        field whose value is a short JSON scalar. A marker of accel_hydra 0.1 (sizes
        only, no ``checksum``) gives ``checksum`` None and every ``hash`` None.

    Raises:
        MarkerError: the bytes are not such a marker; the message says what is wrong.
    """
    if len(raw) > MARKER_MAX_BYTES:
        raise MarkerError(f"the marker has {len(raw)} bytes, more than {MARKER_MAX_BYTES}")
    try:
        record = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_no_duplicate_keys,
            parse_constant=_no_constant,
        )
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError, JSONDecodeError too
        raise MarkerError(f"the marker is not valid UTF-8 JSON ({type(err).__name__})") from None
    if not isinstance(record, dict):
        raise MarkerError(f"the marker is a JSON {type(record).__name__}, not an object")
    parsed: dict[str, Any] = {}
    for key in _PROGRESS:
        value = record.get(key, 0 if key == "batches_in_epoch" else None)
        if value is None:
            raise MarkerError(f"the marker has no {key!r}")
        parsed[key] = _count(key, value, _MAX_COUNT)
    if "checksum" not in record and _is_size_only(record.get("files")):
        # Written by accel_hydra 0.1, before checksums: sizes only. Still a checkpoint
        # (an upgrade must not turn every saved run into "damaged"); it is verified by
        # size, and hashes could be forged by whoever can write the marker anyway.
        parsed["checksum"] = None
        parsed["files"] = _files(
            {rel: {"size": size, "hash": None} for rel, size in record["files"].items()},
            size_only=True,
        )
    elif record.get("checksum") != CHECKSUM:
        raise MarkerError(
            f"the marker's checksum is {_short(record.get('checksum'))}, not {CHECKSUM!r}"
        )
    else:
        parsed["checksum"] = CHECKSUM
        parsed["files"] = _files(record.get("files"))
    for key, value in record.items():
        if key in parsed:
            continue
        if not _short_scalar(value):
            raise MarkerError(f"the marker's field {_short(key)} is not a short JSON scalar")
        parsed[key] = value
    return parsed


def _is_size_only(files: Any) -> bool:
    return (
        isinstance(files, dict)
        and bool(files)
        and all(type(size) is int for size in files.values())
    )


def _files(files: Any, size_only: bool = False) -> dict[str, dict[str, Any]]:
    if not isinstance(files, dict):
        raise MarkerError(f"the marker's 'files' is {_short(files)}, not an object")
    if not 0 < len(files) <= _MAX_FILES:
        raise MarkerError(f"the marker lists {len(files)} files, not 1 to {_MAX_FILES}")
    checked = {}
    for rel, record in files.items():
        check_relative_name(rel)
        if not isinstance(record, dict) or set(record) != {"size", "hash"}:
            raise MarkerError(f"the record of {rel} is {_short(record)}, not {{size, hash}}")
        digest = record["hash"]
        if not size_only and not (
            isinstance(digest, str)
            and len(digest) == CHECKSUM_HEX_DIGITS
            and all(c in "0123456789abcdef" for c in digest)
        ):
            raise MarkerError(f"the hash of {rel} is {_short(digest)}, not {CHECKSUM} hex")
        checked[rel] = {"size": _count(f"size of {rel}", record["size"], _MAX_SIZE), "hash": digest}
    directories = {rel.rsplit("/", i)[0] for rel in checked for i in range(1, rel.count("/") + 1)}
    clash = directories.intersection(checked)
    if clash:
        raise MarkerError(f"{sorted(clash)[0]} is listed both as a file and as a directory")
    return checked


def _count(what: str, value: Any, limit: int) -> int:
    # bool is an int to Python, never to a reader of the marker.
    if type(value) is not int or not 0 <= value <= limit:
        raise MarkerError(f"the marker's {what} is {_short(value)}, not an integer 0..{limit}")
    return value


def _short_scalar(value: Any) -> bool:
    if isinstance(value, str):
        return len(value) <= _EXTRA_MAX_CHARS
    if isinstance(value, int) and not isinstance(value, bool):
        return abs(value) <= _MAX_COUNT
    return value is None or isinstance(value, (bool, float))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    record = dict(pairs)
    if len(record) != len(pairs):
        raise ValueError("duplicate key")
    return record


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
