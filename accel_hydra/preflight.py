"""Pre-flight checks: find in seconds what would otherwise fail after an epoch.

A run writes into its ``project_dir``, ``checkpoint_dir`` and ``log_dir`` long after
it starts: the first checkpoint comes after the first epoch. Probing each directory
before the first batch turns a late traceback into an early one-line error. A probe
leaves no trace: a directory that does not exist yet is not created (its nearest
existing parent is probed instead), and the probe file is removed at once.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

__all__ = ["PreflightError", "check_writable", "probe_remote_put"]

_PROBE_PREFIX = ".accel_hydra_probe_"


class PreflightError(ValueError):
    """A setting the run cannot work with, found before the first batch."""


def check_writable(
    label: str, url: str, storage_options: dict | None = None, timeout: float | None = None
) -> None:
    """Raise :class:`PreflightError` unless files can be written at ``url``.

    Args:
        label: the setting's name for the message (``"checkpoint_dir"``).
        url: a local path or fsspec URL.
        storage_options: fsspec options for a remote ``url``.
        timeout: seconds each request to a remote store may wait (``storage_timeout``).

    Raises:
        PreflightError: naming ``label``, ``url``, why, and what to change.
    """
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    from accel_hydra.redaction import redact
    from accel_hydra.storage import DEFAULT_STORAGE_TIMEOUT, CheckpointStore, MissingBucketError

    try:
        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        if isinstance(fs, LocalFileSystem):
            _probe_local(os.path.abspath(root))
        else:
            # The store's own filesystem: its requests are bounded by ``timeout``, and a
            # missing bucket is named as such, not as "not writable".
            bound = timeout if timeout is not None else DEFAULT_STORAGE_TIMEOUT
            store = CheckpointStore(url, storage_options, timeout=bound)
            store.check_bucket(label)
            probe_remote_put(store.fs, store.root)
    except PreflightError:
        raise
    except MissingBucketError as err:
        raise PreflightError(str(err)) from None
    except Exception as err:  # any failure to write is the same answer: not writable
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise PreflightError(
            f"{label} {redact(str(url))} is not writable ({reason}); fix its permissions, "
            f"or set trainer.{label} to a directory you can write"
        ) from err


def _probe_local(path: str) -> None:
    existing = path
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        raise NotADirectoryError(f"{existing} is a file, not a directory")
    probe = os.path.join(existing, f"{_PROBE_PREFIX}{uuid.uuid4().hex}")
    with open(probe, "x"):
        pass
    os.remove(probe)


def probe_remote_put(fs: Any, root: str) -> None:
    """Put and delete an empty object under ``root``: the bucket exists and is writable."""
    probe = f"{root.rstrip('/')}/{_PROBE_PREFIX}{uuid.uuid4().hex}"
    try:
        fs.pipe_file(probe, b"")
    except Exception:
        if fs.exists(root):
            raise
        # Object stores need no directories; hierarchical ones (FTP, SFTP) do, and the
        # run creates checkpoint_dir anyway.
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"")
    fs.rm_file(probe)
