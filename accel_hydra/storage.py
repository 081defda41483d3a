"""CheckpointStore: every byte of a checkpoint moves through here, via fsspec.

The checkpoint mixin decides *what* to save and *when*; this store decides *how*:
where a checkpoint is staged, how it reaches ``checkpoint_dir``, how it is committed,
listed, pruned and fetched back.

A checkpoint ``<checkpoint_dir>/<name>/`` exists only once its commit marker
(:data:`MARKER`) is stored, and the marker is always written last. Readers
(``latest``, pruning, resume) ignore any directory without it, so a save killed
half-way is invisible.

On a local filesystem a checkpoint is written into a hidden staging directory beside
its final place and renamed into place after the marker is written, so replacing
``best`` never leaves a half-written ``best`` behind. Other filesystems (``s3://``,
``gs://``, ``az://``, ``memory://``...) stage on local disk and upload the files, the
marker last; :mod:`accel_hydra.uploader` runs that upload in the background.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from accel_hydra.init_weights import is_accelerate_checkpoint
from accel_hydra.retention import checkpoint_order

__all__ = [
    "MARKER",
    "CheckpointCorruptError",
    "CheckpointNotFoundError",
    "CheckpointStore",
    "staged_files",
]

#: File whose presence makes a checkpoint directory committed. Holds its progress record.
MARKER = "accel_hydra_committed.json"
_STAGING_PREFIX = ".staging-"
_RETIRED_PREFIX = ".retired-"
_CORRUPT_PREFIX = ".corrupt-"


class CheckpointNotFoundError(FileNotFoundError):
    """Raised when a checkpoint to resume from is missing or was never committed."""


class CheckpointCorruptError(RuntimeError):
    """Raised when a committed checkpoint cannot be loaded.

    Attributes:
        damaged: True when its bytes are provably damaged (a file the marker lists is
            missing or has the wrong size); False when loading failed for another
            reason (for example, a model that no longer matches the checkpoint).
    """

    def __init__(self, message: str, damaged: bool = False) -> None:
        super().__init__(message)
        self.damaged = damaged


class CheckpointStore:
    """Stage, commit, list, prune and fetch checkpoints under one fsspec URL.

    Args:
        url: a local path, ``file://`` URL or any fsspec URL (``memory://``, ``s3://``...).
        storage_options: keyword arguments for the fsspec filesystem (credentials, endpoint).

    Example:
        >>> store = CheckpointStore("/tmp/run/checkpoints")  # doctest: +SKIP
        >>> stage = store.staging_dir("step_100")            # doctest: +SKIP
        >>> ...  # write files into stage
        >>> store.commit("step_100", stage, {"step": 100, "epoch": 1})  # doctest: +SKIP
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = str(url)
        self.fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        self.root = root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)

    @property
    def is_remote(self) -> bool:
        """Whether checkpoints are uploaded from a local stage (anything but local disk)."""
        return not self.is_local

    def path(self, name: str) -> str:
        """Path of checkpoint ``name`` on the store's filesystem."""
        return f"{self.root}/{name}"

    def display(self, name: str | None = None) -> str:
        """Human-readable location of the store or of one checkpoint in it."""
        base = self.url.rstrip("/")
        return base if name is None else f"{base}/{name}"

    # -- writing ---------------------------------------------------------------------

    @property
    def staging_root(self) -> str:
        """The local directory that holds the stages of a remote store, keyed by its URL."""
        key = hashlib.sha1(self.url.encode()).hexdigest()[:16]
        return os.path.join(tempfile.gettempdir(), "accel_hydra_stage", key)

    def staging_dir(self, name: str) -> str:
        """A local directory to write checkpoint ``name`` into, the same on every process.

        Local stores stage beside the final place (a rename then commits it); remote
        stores stage under the system temp directory (:attr:`staging_root`).
        """
        if self.is_local:
            return os.path.join(self.root, _STAGING_PREFIX + name)
        return os.path.join(self.staging_root, name)

    def clear_staging(self, name: str) -> None:
        """Remove a stale staging directory left by an earlier, interrupted save."""
        shutil.rmtree(self.staging_dir(name), ignore_errors=True)

    def commit(self, name: str, staged: str, info: dict[str, Any]) -> None:
        """Make the files in ``staged`` the committed checkpoint ``name``.

        Remote stores upload every staged file, then write the marker, then remove the
        stage; if anything fails the stage is kept, so the save can be retried.

        Args:
            name: checkpoint name (``step_100``, ``epoch_3``, ``best``...).
            staged: local directory holding every file of the checkpoint.
            info: progress record (at least ``step`` and ``epoch``) stored in the marker.
        """
        if self.is_local:
            marker = _marker_text(info, staged_files(staged))
            with open(os.path.join(staged, MARKER), "w") as f:
                f.write(marker)
                f.flush()
                os.fsync(f.fileno())
            self._swap_into_place(name, staged)
            return
        self.clear_target(name)
        files = self.upload(name, staged)
        self.write_marker(name, info, files)
        shutil.rmtree(staged, ignore_errors=True)

    def clear_target(self, name: str) -> None:
        """Delete an earlier checkpoint ``name`` (``best``) before its replacement is uploaded."""
        self.fs.invalidate_cache()
        if self.fs.exists(self.path(name)):
            self.delete(name)

    def upload(self, name: str, staged: str) -> dict[str, int]:
        """Copy the files of a local stage under checkpoint ``name``; no marker.

        On several machines each one uploads the files its own processes staged; one
        process then writes the marker (:meth:`write_marker`) with every file listed.

        Returns:
            relative path -> size of every file uploaded.
        """
        files = staged_files(staged)
        target = self.path(name)
        names = sorted(files)
        # One put() for all files: async stores (s3fs, gcsfs, adlfs) send them at once.
        self.fs.put(
            [os.path.join(staged, *rel.split("/")) for rel in names],
            [f"{target}/{rel}" for rel in names],
        )
        return files

    def write_marker(self, name: str, info: dict[str, Any], files: dict[str, int]) -> None:
        """Commit checkpoint ``name``: call only once every file in ``files`` is stored."""
        with self.fs.open(f"{self.path(name)}/{MARKER}", "w") as f:
            f.write(_marker_text(info, files))
        self.fs.invalidate_cache()

    def _swap_into_place(self, name: str, staged: str) -> None:
        final = self.path(name)
        retired = self.path(_RETIRED_PREFIX + name)
        shutil.rmtree(retired, ignore_errors=True)
        if os.path.exists(final):
            os.rename(final, retired)
        os.rename(staged, final)
        shutil.rmtree(retired, ignore_errors=True)

    def recover(self) -> None:
        """Finish or undo a local save that was interrupted. Call on one process only.

        A staging directory with its marker was committed but not yet moved into
        place: it is moved now. One without a marker is an unfinished save: it is
        removed. A retired copy (the checkpoint a commit was replacing) is removed
        when its replacement is in place, and put back when it is not.
        """
        if not self.is_local or not os.path.isdir(self.root):
            return
        entries = sorted(os.listdir(self.root))
        for entry in entries:
            if entry.startswith(_STAGING_PREFIX):
                full = os.path.join(self.root, entry)
                if os.path.exists(os.path.join(full, MARKER)):
                    self._swap_into_place(entry[len(_STAGING_PREFIX) :], full)
                else:
                    shutil.rmtree(full, ignore_errors=True)
        for entry in entries:
            if entry.startswith(_RETIRED_PREFIX):
                full = os.path.join(self.root, entry)
                if not os.path.exists(full):
                    continue
                name = entry[len(_RETIRED_PREFIX) :]
                if os.path.exists(os.path.join(self.path(name), MARKER)):
                    shutil.rmtree(full, ignore_errors=True)
                elif os.path.exists(os.path.join(full, MARKER)):
                    shutil.rmtree(self.path(name), ignore_errors=True)
                    os.rename(full, self.path(name))

    # -- reading ---------------------------------------------------------------------

    def committed(self) -> dict[str, dict[str, Any]]:
        """Every committed checkpoint: name -> the progress record in its marker."""
        # s3fs, gcsfs and adlfs cache listings; another process may have committed since.
        self.fs.invalidate_cache()
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return {}
        found = {}
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry["type"] != "directory" or name.startswith("."):
                continue
            info = self.read_marker(name)
            if info is not None:
                found[name] = info
        return found

    def latest(self) -> str | None:
        """The committed checkpoint with the most training progress, or None."""
        committed = self.committed()
        if not committed:
            return None
        return max(committed, key=lambda name: checkpoint_order(name, committed[name]))

    def read_marker(self, name: str) -> dict[str, Any] | None:
        """The progress record of checkpoint ``name``, or None if it is not committed."""
        try:
            with self.fs.open(f"{self.path(name)}/{MARKER}", "r") as f:
                return json.loads(f.read())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def delete(self, name: str) -> None:
        """Delete checkpoint ``name``: the marker first, so a partial delete is uncommitted."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(f"{self.path(name)}/{MARKER}")
        if self.fs.exists(self.path(name)):
            self.fs.rm(self.path(name), recursive=True)

    def verify(self, name: str) -> None:
        """Check that every file the marker lists is present with its recorded size.

        Raises:
            CheckpointCorruptError: naming the first missing or truncated file.
        """
        info = self.read_marker(name) or {}
        for rel, size in sorted(info.get("files", {}).items()):
            path = f"{self.path(name)}/{rel}"
            try:
                found = self.fs.size(path)
            except FileNotFoundError:
                found = None
            if found != size:
                state = "is missing" if found is None else f"has {found} bytes, not {size}"
                raise CheckpointCorruptError(
                    f"checkpoint {self.display(name)} is damaged: {rel} {state}", damaged=True
                )

    def quarantine(self, name: str) -> str:
        """Move a damaged checkpoint out of the way (kept for inspection); return its name."""
        hidden = _CORRUPT_PREFIX + name
        if self.fs.exists(self.path(hidden)):
            self.fs.rm(self.path(hidden), recursive=True)
        self.fs.mv(self.path(name), self.path(hidden), recursive=True)
        return hidden

    def fetch(self, name: str, cache_dir: str | None = None, download: bool = True) -> str:
        """A local directory holding checkpoint ``name``, downloading it if remote.

        Args:
            name: the checkpoint.
            cache_dir: where remote checkpoints are downloaded; default: the temp dir.
            download: False only checks the checkpoint and returns where it will be, for
                processes that share a machine with the one that downloads it.

        Raises:
            CheckpointNotFoundError: the checkpoint is missing or has no commit marker.
            CheckpointCorruptError: a file the marker lists is missing or truncated.
        """
        if self.read_marker(name) is None:
            where = self.display(name)
            if is_accelerate_checkpoint(self.fs, self.path(name)):
                raise CheckpointNotFoundError(
                    f"checkpoint {where} is an upstream AccelHydra or plain Accelerate "
                    f"checkpoint (no {MARKER}): it cannot be resumed; start from its weights "
                    f"with trainer.init_from={where} (see docs/migrating.rst)"
                )
            if self.fs.exists(self.path(name)):
                raise CheckpointNotFoundError(
                    f"checkpoint {where} has no commit marker ({MARKER}): its save did not "
                    "finish. Resume from another checkpoint, or use 'latest'."
                )
            raise CheckpointNotFoundError(
                f"checkpoint {where} does not exist. Check resume_from_checkpoint, or use "
                "'latest' to pick the newest committed checkpoint."
            )
        self.verify(name)
        if self.is_local:
            return self.path(name)
        key = hashlib.sha1(self.url.encode()).hexdigest()[:16]
        local = os.path.join(cache_dir or tempfile.gettempdir(), "accel_hydra_fetch", key, name)
        if not download:
            return local
        shutil.rmtree(local, ignore_errors=True)
        info = self.read_marker(name) or {}
        for rel in sorted(info.get("files", {})):
            destination = os.path.join(local, *rel.split("/"))
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            self.fs.get_file(f"{self.path(name)}/{rel}", destination)
        return local


def staged_files(staged: str) -> dict[str, int]:
    """Relative path (``/``-separated) -> size of every file in a stage, marker excluded."""
    files = {}
    for dirpath, _, filenames in os.walk(staged):
        for filename in filenames:
            local = os.path.join(dirpath, filename)
            rel = os.path.relpath(local, staged).replace(os.sep, "/")
            if rel != MARKER:
                files[rel] = os.path.getsize(local)
    return files


def _marker_text(info: dict[str, Any], files: dict[str, int]) -> str:
    return json.dumps({**info, "files": files}, sort_keys=True)
