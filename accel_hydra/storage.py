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

Nothing read back is trusted: a marker is validated like input from the internet
(:mod:`accel_hydra.marker`), and every file it lists is checked against the size and
checksum it records (:mod:`accel_hydra.checksums`) before a checkpoint is loaded. A
checkpoint that fails either check is *damaged*: it is named, skipped by ``latest``,
ignored by retention and moved aside (:meth:`CheckpointStore.quarantine`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from stat import S_ISREG
from typing import Any, NoReturn

import fsspec
from fsspec.implementations.local import LocalFileSystem

from accel_hydra.checksums import checksum_files
from accel_hydra.init_weights import is_accelerate_checkpoint
from accel_hydra.marker import (
    MARKER,
    MARKER_MAX_BYTES,
    MarkerError,
    check_checkpoint_name,
    check_relative_name,
    marker_bytes,
    parse_marker,
)
from accel_hydra.redaction import redact
from accel_hydra.retention import checkpoint_order

__all__ = [
    "DEFAULT_STORAGE_TIMEOUT",
    "MARKER",
    "CheckpointCorruptError",
    "CheckpointNotFoundError",
    "CheckpointStore",
    "MissingBucketError",
    "bounded_storage_options",
    "staged_files",
    "staged_records",
]

#: Seconds a single request to a remote store may wait for the server (connect, or
#: the next bytes of an answer) before it counts as failed.
DEFAULT_STORAGE_TIMEOUT = 60.0
_STAGING_PREFIX = ".staging-"
_RETIRED_PREFIX = ".retired-"
_CORRUPT_PREFIX = ".corrupt-"
# The marker while it is written; never listed (a stage holding it is unfinished).
_MARKER_TEMP = ".accel_hydra_committed.json.tmp"


class CheckpointNotFoundError(FileNotFoundError):
    """Raised when a checkpoint to resume from is missing or was never committed."""


class MissingBucketError(FileNotFoundError):
    """Raised at start when the bucket or container of ``checkpoint_dir`` does not exist."""


class CheckpointCorruptError(RuntimeError):
    """Raised when a committed checkpoint cannot be loaded.

    Attributes:
        damaged: True when its bytes are provably damaged (its marker is malformed, or
            a file the marker lists is missing or has another size or checksum than
            the marker records); False when loading failed for another
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
        timeout: seconds one request to a remote store may wait for the server; see
            :func:`bounded_storage_options`. ``None`` keeps the filesystem's defaults.

    Attributes:
        run_id: when set, remote stages live under a directory of their own for this
            run (:attr:`staging_root`), so two runs never share, clear or reuse one.

    Example:
        >>> store = CheckpointStore("/tmp/run/checkpoints")  # doctest: +SKIP
        >>> stage = store.staging_dir("step_100")            # doctest: +SKIP
        >>> ...  # write files into stage
        >>> store.commit("step_100", stage, {"step": 100, "epoch": 1})  # doctest: +SKIP
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> None:
        self.url = str(url)
        protocol = fsspec.utils.get_protocol(self.url)
        options = bounded_storage_options(protocol, storage_options, timeout)
        self.fs, root = fsspec.core.url_to_fs(self.url, **options)
        self.root = root.rstrip("/") or "/"
        self.is_local = isinstance(self.fs, LocalFileSystem)
        self.run_id: str | None = None
        if timeout is not None and _is_s3(self.fs):
            # s3fs retries a timed-out request 5 times on top of botocore's own retries:
            # a stalled endpoint would hold every call for 10 timeouts. botocore's retry
            # (set in bounded_storage_options) is enough.
            self.fs.retries = 1

    def check_bucket(self, label: str = "checkpoint_dir") -> None:
        """Fail at once when the bucket (container) of an object-store URL is missing.

        Without it, a typo in the bucket name reads as "no checkpoint yet" and the run
        fails only at its first save, possibly hours later.

        Raises:
            MissingBucketError: naming the bucket and the URL.
        """
        if not _is_object_store(self.fs):
            return
        bucket = self.root.split("/", 1)[0]
        self.fs.invalidate_cache()
        try:
            found = self.fs.exists(bucket)
        except (PermissionError, OSError):
            # Credentials that may write under a prefix but not look at the bucket
            # itself: the first real request will tell.
            return
        if not found:
            kind = "container" if _protocols(self.fs) & {"az", "abfs", "abfss"} else "bucket"
            raise MissingBucketError(
                f"{label} {self.display()}: {kind} {bucket!r} does not exist; "
                f"create it, or fix the URL in {label}"
            )

    @property
    def is_remote(self) -> bool:
        """Whether checkpoints are uploaded from a local stage (anything but local disk)."""
        return not self.is_local

    def path(self, name: str) -> str:
        """Path of checkpoint ``name`` on the store's filesystem."""
        return f"{self.root}/{name}"

    def display(self, name: str | None = None) -> str:
        """Human-readable location of the store or of one checkpoint in it.

        Credentials inside the URL (``user:password@``) are hidden: this is what every
        message, summary and saved record shows.
        """
        base = redact(self.url.rstrip("/"))
        return base if name is None else f"{base}/{name}"

    # -- writing ---------------------------------------------------------------------

    @property
    def staging_root(self) -> str:
        """The local directory that holds the stages of a remote store, keyed by its URL
        and, once :attr:`run_id` is set, by the run."""
        key = hashlib.sha1(self.url.encode()).hexdigest()[:16]
        root = os.path.join(tempfile.gettempdir(), "accel_hydra_stage", key)
        return os.path.join(root, self.run_id) if self.run_id else root

    def staging_dir(self, name: str) -> str:
        """A local directory to write checkpoint ``name`` into, the same on every process.

        Local stores stage beside the final place (a rename then commits it); remote
        stores stage under the system temp directory (:attr:`staging_root`).

        Raises:
            ValueError: ``name`` is not a plain name (letters, digits, ``_.+=@-``).
        """
        try:
            check_checkpoint_name(name)
        except MarkerError as err:
            raise ValueError(f"cannot save a checkpoint as {name!r}: {err}") from None
        if self.is_local:
            return os.path.join(self.root, _STAGING_PREFIX + name)
        return os.path.join(self.staging_root, name)

    def clear_staging(self, name: str) -> None:
        """Remove a stale staging directory left by an earlier, interrupted save."""
        shutil.rmtree(self.staging_dir(name), ignore_errors=True)

    def seal(self, staged: str, info: dict[str, Any]) -> None:
        """Write the marker into a local stage, so the stage alone is a checkpoint.

        A remote save whose upload fails keeps its stage; sealed, that stage can be
        resumed with ``resume_from_checkpoint=<stage path>``. The local copy of the
        marker is never uploaded as a file (:func:`staged_files` leaves it out).
        """
        _write_local_marker(staged, marker_bytes(info, staged_records(staged)))

    def commit(self, name: str, staged: str, info: dict[str, Any], callback: Any = None) -> None:
        """Make the files in ``staged`` the committed checkpoint ``name``.

        The marker records the size and checksum of every staged file. Local stores
        write it into the stage under a temporary name, flush it to disk, rename it,
        then rename the stage into place; if writing it fails (a full disk), the stage
        is removed and the committed checkpoints are untouched. Remote stores upload
        every staged file, then put the marker as one object, then remove the stage;
        if anything fails the stage is kept, so the save can be retried.

        Args:
            name: checkpoint name (``step_100``, ``epoch_3``, ``best``...).
            staged: local directory holding every file of the checkpoint.
            info: progress record (at least ``step`` and ``epoch``) stored in the marker.
            callback: an fsspec callback told about upload progress (remote only).
        """
        if self.is_local:
            try:
                _write_local_marker(staged, marker_bytes(info, staged_records(staged)))
            except BaseException:
                # Frees the space a full disk needs back; nothing committed was touched.
                shutil.rmtree(staged, ignore_errors=True)
                raise
            self._swap_into_place(name, staged)
            return
        self.clear_target(name)
        files = self.upload(name, staged, callback)
        self.write_marker(name, info, files)
        shutil.rmtree(staged, ignore_errors=True)

    def clear_target(self, name: str) -> None:
        """Take an earlier checkpoint ``name`` (``best``) out of the way of its replacement.

        An object store cannot rename a directory, so a committed one is first copied
        on the server to ``.retired-<name>``, marker last (the copy is a whole
        checkpoint of its own), and only then deleted. Until the replacement's marker
        is stored (:meth:`write_marker` then deletes the copy), a failed or killed
        upload leaves the copy, which :meth:`recover` puts back: replacing ``best``
        never loses the committed one.
        """
        self.fs.invalidate_cache()
        if not self.fs.exists(self.path(name)):
            return
        if self.is_remote and self.load_marker(name) is not None:
            self._copy_on_server(name, _RETIRED_PREFIX + name)
        self.delete(name)

    def _copy_on_server(self, source_name: str, target_name: str) -> None:
        """Copy checkpoint ``source_name`` to ``target_name`` on the store, marker last."""
        source, target = self.path(source_name), self.path(target_name)
        self.fs.invalidate_cache()
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)
        files = [path for path in self.fs.find(source) if not path.endswith(f"/{MARKER}")]
        self.fs.copy(files, [target + path[len(source) :] for path in files])
        self.fs.copy(f"{source}/{MARKER}", f"{target}/{MARKER}")
        self.fs.invalidate_cache()

    def upload(self, name: str, staged: str, callback: Any = None) -> dict[str, dict[str, Any]]:
        """Copy the files of a local stage under checkpoint ``name``; no marker.

        On several machines each one uploads the files its own processes staged; one
        process then writes the marker (:meth:`write_marker`) with every file listed.

        Returns:
            relative path -> ``{"size", "hash"}`` of every file uploaded, checksummed
            on local disk before the upload.
        """
        files = staged_records(staged)
        target = self.path(name)
        names = sorted(files)
        # One put() for all files: async stores (s3fs, gcsfs, adlfs) send them at once.
        self.fs.put(
            [os.path.join(staged, *rel.split("/")) for rel in names],
            [f"{target}/{rel}" for rel in names],
            **({"callback": callback} if callback is not None else {}),
        )
        return files

    def write_marker(self, name: str, info: dict[str, Any], files: dict[str, Any]) -> None:
        """Commit checkpoint ``name``: call only once every file in ``files`` is stored.

        The marker is put as one object, so a reader sees all of it or none.
        """
        self.fs.pipe_file(f"{self.path(name)}/{MARKER}", marker_bytes(info, files))
        self.fs.invalidate_cache()
        retired = self.path(_RETIRED_PREFIX + name)
        if self.fs.exists(retired):  # the copy clear_target kept while this one uploaded
            self.fs.rm(retired, recursive=True)
            self.fs.invalidate_cache()

    def _swap_into_place(self, name: str, staged: str) -> None:
        final = self.path(name)
        retired = self.path(_RETIRED_PREFIX + name)
        shutil.rmtree(retired, ignore_errors=True)
        if os.path.exists(final):
            os.rename(final, retired)
        try:
            os.rename(staged, final)
        except BaseException:
            if os.path.exists(retired) and not os.path.exists(final):
                os.rename(retired, final)
            raise
        shutil.rmtree(retired, ignore_errors=True)

    def recover(self) -> None:
        """Finish or undo a local save that was interrupted. Call on one process only.

        A staging directory whose marker is valid and whose files match it was
        committed but not yet moved into place: it is moved now. Any other staging
        directory (no marker, an empty or cut-off one, a file that does not match) is
        an unfinished save: it is removed, and the committed checkpoint of that name
        is left alone. A retired copy (the checkpoint a commit was replacing) is
        removed when its replacement is in place, and put back when it is not; on an
        object store too (see :meth:`clear_target`).
        """
        if self.is_remote:
            self._recover_remote()
            return
        if not os.path.isdir(self.root):
            return
        entries = sorted(os.listdir(self.root))
        for entry in entries:
            if entry.startswith(_STAGING_PREFIX):
                full = os.path.join(self.root, entry)
                if self._stage_is_complete(full):
                    self._swap_into_place(entry[len(_STAGING_PREFIX) :], full)
                else:
                    shutil.rmtree(full, ignore_errors=True)
        for entry in entries:
            if entry.startswith(_RETIRED_PREFIX):
                full = os.path.join(self.root, entry)
                if not os.path.exists(full):
                    continue
                name = entry[len(_RETIRED_PREFIX) :]
                if _local_marker_is_valid(self.path(name)):
                    shutil.rmtree(full, ignore_errors=True)
                elif _local_marker_is_valid(full):
                    shutil.rmtree(self.path(name), ignore_errors=True)
                    os.rename(full, self.path(name))

    def _recover_remote(self) -> None:
        """Put back a retired copy whose replacement's upload never committed."""
        self.fs.invalidate_cache()
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return
        for path in entries:
            entry = path.rstrip("/").rsplit("/", 1)[-1]
            if not entry.startswith(_RETIRED_PREFIX):
                continue
            name = entry[len(_RETIRED_PREFIX) :]
            if self.load_marker(name) is None and self.load_marker(entry) is not None:
                if self.fs.exists(self.path(name)):
                    self.fs.rm(self.path(name), recursive=True)  # a cut-off replacement
                self._copy_on_server(entry, name)
            self.fs.rm(self.path(entry), recursive=True)
        self.fs.invalidate_cache()

    def _stage_is_complete(self, staged: str) -> bool:
        """Whether a local stage holds a valid marker and every file it lists, unchanged."""
        try:
            files = _read_local_marker(staged)["files"]
            self._check_files(os.path.basename(staged), staged, files)
        except (MarkerError, CheckpointCorruptError, OSError):
            return False
        return True

    # -- reading ---------------------------------------------------------------------

    def scan(self) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """One listing of the store: the committed checkpoints and the damaged ones.

        Returns:
            ``(committed, damaged)``: name -> the validated record of its marker, and
            name -> why its marker is damaged. Directories without a marker, and
            names starting with a dot or that are not plain names, are in neither.
        """
        # s3fs, gcsfs and adlfs cache listings; another process may have committed since.
        self.fs.invalidate_cache()
        try:
            entries = self.fs.ls(self.root, detail=True)
        except FileNotFoundError:
            return {}, {}
        committed, damaged = {}, {}
        for entry in entries:
            name = entry["name"].rstrip("/").rsplit("/", 1)[-1]
            if entry["type"] != "directory" or name.startswith("."):
                continue
            try:
                check_checkpoint_name(name)
            except MarkerError:
                continue
            try:
                info = self.load_marker(name)
            except CheckpointCorruptError as err:
                damaged[name] = str(err)
                continue
            if info is not None:
                committed[name] = info
        return committed, damaged

    def committed(self) -> dict[str, dict[str, Any]]:
        """Every committed checkpoint with a valid marker: name -> its progress record."""
        return self.scan()[0]

    def damaged(self) -> dict[str, str]:
        """Every checkpoint whose marker is damaged: name -> why."""
        return self.scan()[1]

    def latest(self) -> str | None:
        """The committed checkpoint with the most training progress, or None."""
        committed = self.committed()
        if not committed:
            return None
        return max(committed, key=lambda name: checkpoint_order(name, committed[name]))

    def read_marker(self, name: str) -> dict[str, Any] | None:
        """The validated marker of checkpoint ``name``; None if it has none or a damaged one."""
        try:
            return self.load_marker(name)
        except CheckpointCorruptError:
            return None

    def load_marker(self, name: str) -> dict[str, Any] | None:
        """The validated marker of checkpoint ``name``, or None if it has none.

        Raises:
            CheckpointCorruptError: (``damaged=True``) the marker is not one this
                library writes: not UTF-8 JSON, a field of the wrong type or out of
                bounds, a file name outside the checkpoint directory...
        """
        check_checkpoint_name(name)
        path = f"{self.path(name)}/{MARKER}"
        try:
            with self.fs.open(path, "rb") as f:
                raw = f.read(MARKER_MAX_BYTES + 1)
        except FileNotFoundError:
            return None
        except (IsADirectoryError, NotADirectoryError):
            raw = b"<a directory>"
        try:
            return parse_marker(raw)
        except MarkerError as err:
            raise CheckpointCorruptError(
                f"checkpoint {self.display(name)} is damaged: {err}", damaged=True
            ) from None

    def delete(self, name: str) -> None:
        """Delete checkpoint ``name``: the marker first, so a partial delete is uncommitted."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(f"{self.path(name)}/{MARKER}")
        if self.fs.exists(self.path(name)):
            self.fs.rm(self.path(name), recursive=True)

    def verify(self, name: str) -> None:
        """Check checkpoint ``name`` where it is stored, without loading it.

        Local stores check the size and checksum of every file the marker lists;
        remote ones check the sizes (the checksums are checked after the download, by
        :meth:`fetch`).

        Raises:
            CheckpointNotFoundError: the checkpoint is missing or has no commit marker.
            CheckpointCorruptError: (``damaged=True``) its marker is damaged, or a
                file is missing or differs from its record; the message names it.
        """
        files = self._committed_files(name)
        if self.is_local:
            self._check_files(name, self.path(name), files)
        else:
            self._check_remote_sizes(name, files)

    def fetch(
        self, name: str, cache_dir: str | None = None, download: bool = True, verify: bool = True
    ) -> str:
        """A local directory holding checkpoint ``name``, verified, downloading it if remote.

        Every file the marker lists is checked against its size and checksum before
        this returns: in place for a local store, after the download into the cache
        for a remote one. Downloads never write outside
        ``<cache_dir>/accel_hydra_fetch/``.

        Args:
            name: the checkpoint.
            cache_dir: where remote checkpoints are downloaded; default: the temp dir.
            download: False only checks the marker and returns where the checkpoint
                will be, for processes that share a machine with the one that
                downloads (and verifies) it.
            verify: False leaves the checksums to :meth:`verify_fetched` (sizes of a
                remote checkpoint are still checked before it is downloaded), so a
                resume can compute them while it parses the files.

        Raises:
            CheckpointNotFoundError: the checkpoint is missing or has no commit marker.
            CheckpointCorruptError: (``damaged=True``) its marker is damaged, or a
                file is missing or differs from its record; the message names it.
        """
        files = self._committed_files(name)
        if self.is_local:
            if download and verify:
                self._check_files(name, self.path(name), files)
            return self.path(name)
        key = hashlib.sha1(self.url.encode()).hexdigest()[:16]
        base = cache_dir or tempfile.gettempdir()
        cache = os.path.realpath(os.path.join(base, "accel_hydra_fetch"))
        local = os.path.join(cache, key, name)
        if not download:
            return local
        self._check_remote_sizes(name, files)
        shutil.rmtree(local, ignore_errors=True)
        names = sorted(files)
        destinations = [os.path.join(local, *rel.split("/")) for rel in names]
        for destination in destinations:
            # Names are validated; this guards the cache against any gap in that check.
            if os.path.commonpath([cache, os.path.realpath(destination)]) != cache:
                raise CheckpointCorruptError(
                    f"checkpoint {self.display(name)} is damaged: {destination} is outside "
                    f"the download cache {cache}",
                    damaged=True,
                )
            os.makedirs(os.path.dirname(destination), exist_ok=True)
        self.fs.get([f"{self.path(name)}/{rel}" for rel in names], destinations)
        if verify:
            self._check_files(name, local, files)
        return local

    def verify_fetched(self, name: str, local_dir: str) -> None:
        """Check the files of committed checkpoint ``name`` in ``local_dir`` against its
        marker: every listed file there, a regular file of the recorded size and checksum.

        It runs beside the resume's parsing of the same files, so it keeps to one
        thread: the other core is the parser's.

        Raises:
            CheckpointNotFoundError: the checkpoint has no commit marker (any more).
            CheckpointCorruptError: (``damaged=True``) a file is missing or differs.
        """
        self._check_files(name, local_dir, self._committed_files(name), max_threads=1)

    # -- integrity -------------------------------------------------------------------

    def _committed_files(self, name: str) -> dict[str, dict[str, Any]]:
        """The validated file records of committed checkpoint ``name``."""
        where = self.display(name)
        try:
            check_checkpoint_name(name)
        except MarkerError as err:
            raise CheckpointNotFoundError(f"checkpoint {where}: {err}") from None
        info = self.load_marker(name)
        if info is None:
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
        return info["files"]

    def _check_files(
        self,
        name: str,
        local_dir: str,
        files: dict[str, dict[str, Any]],
        max_threads: int | None = None,
    ) -> None:
        """Compare the local copies of ``files`` with their records: sizes, then checksums."""
        paths = {rel: os.path.join(local_dir, *rel.split("/")) for rel in files}
        for rel in sorted(files):
            try:
                stat = os.lstat(paths[rel])
            except (FileNotFoundError, NotADirectoryError):
                self._damaged(name, f"{rel} is missing")
            if not S_ISREG(stat.st_mode):  # a symlink could point anywhere on this machine
                self._damaged(name, f"{rel} is not a regular file")
            if stat.st_size != files[rel]["size"]:
                self._damaged(name, f"{rel} has {stat.st_size} bytes, not {files[rel]['size']}")
        hashed = {rel: path for rel, path in paths.items() if files[rel]["hash"] is not None}
        found = checksum_files(hashed, max_threads)
        for rel in sorted(hashed):
            if found[rel] != files[rel]:
                self._damaged(
                    name, f"{rel} does not match its checksum: its bytes changed after the save"
                )

    def _check_remote_sizes(self, name: str, files: dict[str, dict[str, Any]]) -> None:
        """Compare the stored sizes of ``files`` with their records, in one listing."""
        base = self.path(name)
        try:
            listed = self.fs.find(base, detail=True)
        except FileNotFoundError:
            listed = {}
        sizes = {path[len(base) + 1 :]: entry.get("size") for path, entry in listed.items()}
        for rel in sorted(files):
            if rel not in sizes:
                self._damaged(name, f"{rel} is missing")
            if sizes[rel] != files[rel]["size"]:
                self._damaged(name, f"{rel} has {sizes[rel]} bytes, not {files[rel]['size']}")

    def _damaged(self, name: str, problem: str) -> NoReturn:
        raise CheckpointCorruptError(
            f"checkpoint {self.display(name)} is damaged: {problem}", damaged=True
        )

    def quarantine(self, name: str) -> str:
        """Take a damaged checkpoint out of use, keeping its bytes; return where they are.

        Local stores rename it to ``.corrupt-<name>`` (one atomic step). Object stores
        cannot rename a directory: the marker is deleted first (from then on the
        checkpoint is uncommitted, so ``latest`` and retention never see it again),
        then the files are copied to ``.corrupt-<name>`` on the server and deleted. If
        that copy fails the bytes stay, uncommitted, under ``name``, which is returned.

        Raises:
            OSError: not even the marker could be removed (for example read-only
                credentials); the checkpoint is then still committed.
        """
        hidden = _CORRUPT_PREFIX + name
        if self.is_local:
            shutil.rmtree(self.path(hidden), ignore_errors=True)
            os.rename(self.path(name), self.path(hidden))
            return hidden
        source, target = self.path(name), self.path(hidden)
        marker = f"{source}/{MARKER}"
        try:
            raw = self.fs.cat_file(marker)
        except FileNotFoundError:
            raw = None
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(marker)
        self.fs.invalidate_cache()
        try:
            if self.fs.exists(target):
                self.fs.rm(target, recursive=True)
            files = self.fs.find(source)
            self.fs.copy(files, [target + path[len(source) :] for path in files])
            if raw is not None:
                self.fs.pipe_file(f"{target}/{MARKER}", raw)
            self.fs.rm(source, recursive=True)
        except Exception:
            self.fs.invalidate_cache()
            return name
        self.fs.invalidate_cache()
        return hidden


def bounded_storage_options(
    protocol: str, storage_options: dict[str, Any] | None, timeout: float | None
) -> dict[str, Any]:
    """``storage_options`` plus request timeouts for ``protocol``; the user's own win.

    Without them a stalled endpoint holds a call for many minutes (s3fs and botocore
    retry a timed-out request 25 times). What is added, only where the user set
    nothing: ``s3``: ``config_kwargs`` ``connect_timeout`` and ``read_timeout`` =
    ``timeout``, ``retries`` = 2 attempts; ``gs``: ``requests_timeout``; ``az``:
    ``connection_timeout`` and ``read_timeout``.

    Args:
        protocol: the URL scheme (``s3``, ``gs``, ``az``...); others are left alone.
        storage_options: what the user configured (not modified).
        timeout: seconds; ``None`` returns the options unchanged.
    """
    options = dict(storage_options or {})
    if timeout is None:
        return options
    if protocol in ("s3", "s3a"):
        config = dict(options.get("config_kwargs") or {})
        config.setdefault("connect_timeout", timeout)
        config.setdefault("read_timeout", timeout)
        config.setdefault("retries", {"total_max_attempts": 2, "mode": "standard"})
        options["config_kwargs"] = config
    elif protocol in ("gs", "gcs"):
        options.setdefault("requests_timeout", timeout)
    elif protocol in ("az", "abfs", "abfss"):
        options.setdefault("connection_timeout", timeout)
        options.setdefault("read_timeout", timeout)
    return options


def _protocols(fs: Any) -> set[str]:
    protocol = fs.protocol
    return {protocol} if isinstance(protocol, str) else set(protocol)


def _is_s3(fs: Any) -> bool:
    return bool(_protocols(fs) & {"s3", "s3a"})


def _is_object_store(fs: Any) -> bool:
    return bool(_protocols(fs) & {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})


def staged_files(staged: str) -> dict[str, int]:
    """Relative path (``/``-separated) -> size of every file in a stage, marker excluded."""
    return {rel: os.path.getsize(path) for rel, path in _stage_paths(staged).items()}


def staged_records(staged: str) -> dict[str, dict[str, Any]]:
    """Relative path -> ``{"size", "hash"}`` of every file in a stage, marker excluded.

    Raises:
        ValueError: a file name in the stage is not one a marker may list.
    """
    paths = _stage_paths(staged)
    for rel in paths:
        try:
            check_relative_name(rel)
        except MarkerError as err:
            raise ValueError(f"cannot commit {staged}: {err}") from None
    return checksum_files(paths)


def _stage_paths(staged: str) -> dict[str, str]:
    paths = {}
    for dirpath, _, filenames in os.walk(staged):
        for filename in filenames:
            local = os.path.join(dirpath, filename)
            rel = os.path.relpath(local, staged).replace(os.sep, "/")
            if not rel.startswith(MARKER) and not rel.startswith(_MARKER_TEMP):
                paths[rel] = local
    return paths


def _write_local_marker(directory: str, raw: bytes) -> None:
    """Write a marker whole or not at all: a temporary name, fsync, rename, fsync the dir."""
    temporary = os.path.join(directory, _MARKER_TEMP)
    with open(temporary, "wb") as f:
        f.write(raw)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, os.path.join(directory, MARKER))
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_local_marker(directory: str) -> dict[str, Any]:
    """The validated marker in a local directory. Raises MarkerError or OSError."""
    with open(os.path.join(directory, MARKER), "rb") as f:
        return parse_marker(f.read(MARKER_MAX_BYTES + 1))


def _local_marker_is_valid(directory: str) -> bool:
    try:
        _read_local_marker(directory)
    except (MarkerError, OSError):
        return False
    return True
