"""Run lock: one training run at a time per checkpoint directory.

Two runs writing to one ``checkpoint_dir`` overwrite each other's checkpoints, and
each one's clean-up (``recover()``) may delete the other's save in flight. So a run
takes the directory's lock before it touches anything in it, and a second run fails at
start with one line naming the holder.

- Local directories: a lock file (:data:`LOCK_FILE`) held with ``flock`` for as long as
  the process lives; the kernel lets go of it when the process dies, however it dies.
  The file also names host, pid and start time, for the message a second run prints.
- Object stores (and any other fsspec filesystem): a lease object (:data:`LEASE_FILE`)
  naming host, pid, start time and run id, renewed by a daemon thread every quarter of
  its lifetime. A lease not renewed for ``lease_seconds`` has expired.

A lock whose holder is gone is taken over with a notice, so resuming after a SIGKILL
needs no manual step: a lock file nobody holds, a lease of a dead process on this host,
or an expired lease.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "LEASE_FILE",
    "LOCK_FILE",
    "Holder",
    "LocalRunLock",
    "RemoteLease",
    "RunLockHeldError",
]

LOCK_FILE = ".accel_hydra.lock"
LEASE_FILE = ".accel_hydra.lease"
#: Seconds a remote lease lives without renewal; a killed run's lease is free after it.
DEFAULT_LEASE_SECONDS = 120.0


class RunLockHeldError(RuntimeError):
    """Another live run holds the checkpoint directory; the message names it."""


@dataclass
class Holder:
    """Who holds a lock: read from the lock file or lease, so never trusted blindly."""

    host: str
    pid: int
    since: float
    run_id: str
    renewed: float

    @classmethod
    def me(cls, run_id: str, now: float) -> Holder:
        return cls(socket.gethostname(), os.getpid(), now, run_id, now)

    @classmethod
    def parse(cls, text: str | bytes) -> Holder | None:
        """The holder a lock file or lease names, or None when it is not one."""
        try:
            data = json.loads(text)
            holder = cls(
                str(data["host"]),
                int(data["pid"]),
                float(data["since"]),
                str(data["run_id"]),
                float(data["renewed"]),
            )
        except (ValueError, TypeError, KeyError, UnicodeDecodeError):
            return None
        return holder

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.since))
        return f"pid {self.pid} on host {self.host}, running since {since}"

    def is_dead_here(self) -> bool:
        """Whether it is a process of this host that no longer runs."""
        return self.host == socket.gethostname() and not _pid_alive(self.pid)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def _held_message(where: str, holder: Holder | None, how: str) -> str:
    who = holder.describe() if holder else "another run"
    return (
        f"checkpoint_dir {where} is in use by {who} ({how}); wait for that run to end, "
        "stop it, or use another checkpoint_dir"
    )


class LocalRunLock:
    """The lock of a local checkpoint directory: ``flock`` on :data:`LOCK_FILE`.

    Args:
        directory: the checkpoint directory (created if missing).
        run_id: this run's id, written into the lock file.

    Example:
        >>> lock = LocalRunLock("/tmp/run/checkpoints", "a1b2")  # doctest: +SKIP
        >>> notice = lock.acquire()   # RunLockHeldError if another run holds it
        >>> lock.release()
    """

    def __init__(self, directory: str, run_id: str) -> None:
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self.run_id = run_id
        self._fd: int | None = None
        self._made_directory = False

    def acquire(self) -> str | None:
        """Take the lock; return a notice when it was taken over from a dead run.

        Raises:
            RunLockHeldError: a live process holds it.
        """
        # A run refused or failed at start leaves no empty checkpoint_dir behind.
        self._made_directory = not os.path.isdir(self.directory)
        os.makedirs(self.directory, exist_ok=True)
        for _ in range(5):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as err:
                previous = Holder.parse(_read_fd(fd))
                os.close(fd)
                if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunLockHeldError(
                        _held_message(self.directory, previous, f"lock file {self.path}")
                    ) from None
                raise
            # The holder may have released and removed the file between our open and
            # our flock: then we hold a lock on a file nobody else will ever open.
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:
                os.close(fd)
                continue
            previous = Holder.parse(_read_fd(fd))
            me = Holder.me(self.run_id, time.time())
            os.ftruncate(fd, 0)
            os.pwrite(fd, me.to_json().encode(), 0)
            os.fsync(fd)
            self._fd = fd
            if previous is None:
                return None
            return (
                f"accel_hydra: took over the lock of {self.directory} left by "
                f"{previous.describe()}; that run is gone"
            )
        raise RunLockHeldError(_held_message(self.directory, None, f"lock file {self.path}"))

    def release(self) -> None:
        """Let go of the lock and remove the lock file; no-op when not held."""
        if self._fd is None:
            return
        # Removed while still held, so no one opens a file about to be unlocked.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None
        if self._made_directory:
            with contextlib.suppress(OSError):  # not empty: the run saved something
                os.rmdir(self.directory)


def _read_fd(fd: int) -> bytes:
    return os.pread(fd, 4096, 0)


class RemoteLease:
    """The lock of a checkpoint directory on an object store: a renewed lease object.

    Object stores have no locks; a lease is the next best thing. It does not stop two
    runs started within the same second, which both read "free"; it stops every run
    started while another one lives. Expiry compares the holder's clock with ours:
    machines sharing a store should keep their clocks within ``lease_seconds``.

    Args:
        fs: the store's fsspec filesystem.
        root: the checkpoint directory on ``fs``.
        where: how to name the directory in messages (credentials removed).
        run_id: this run's id, written into the lease.
        lease_seconds: how long the lease lives without renewal.
    """

    def __init__(
        self,
        fs: Any,
        root: str,
        where: str,
        run_id: str,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> None:
        self.fs = fs
        self.path = f"{root.rstrip('/')}/{LEASE_FILE}"
        self.where = where
        self.run_id = run_id
        self.lease_seconds = lease_seconds
        self._me: Holder | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def read(self) -> Holder | None:
        """The holder the lease object names, or None when there is none (or it is junk)."""
        try:
            return Holder.parse(self.fs.cat_file(self.path))
        except FileNotFoundError:
            return None

    def acquire(self) -> str | None:
        """Take the lease and start renewing it; return a notice when taken over.

        Raises:
            RunLockHeldError: a live run holds the lease.
        """
        self.fs.invalidate_cache()
        previous = self.read()
        now = time.time()
        notice = None
        if previous is not None and previous.run_id != self.run_id:
            if previous.is_dead_here():
                why = "that process is gone"
            elif now - previous.renewed >= self.lease_seconds:
                why = f"its lease expired {now - previous.renewed:.0f} s after its last renewal"
            else:
                raise RunLockHeldError(_held_message(self.where, previous, f"lease {self.path}"))
            notice = (
                f"accel_hydra: took over the lease of {self.where} left by "
                f"{previous.describe()}; {why}"
            )
        self._me = Holder.me(self.run_id, now)
        self._write()
        winner = self.read()
        if winner is None or winner.run_id != self.run_id:
            self._me = None
            raise RunLockHeldError(_held_message(self.where, winner, f"lease {self.path}"))
        self._stop.clear()
        self._renewer = threading.Thread(
            target=self._renew, name=f"accel_hydra lease {self.where}", daemon=True
        )
        self._renewer.start()
        return notice

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still ours; never raises."""
        if self._me is None:
            return
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join(timeout=1.0)
        try:
            self.fs.invalidate_cache()
            holder = self.read()
            if holder is not None and holder.run_id == self.run_id:
                self.fs.rm_file(self.path)
        except Exception as err:  # the run is over; a stale lease expires on its own
            print(
                f"accel_hydra: could not remove the lease {self.where}/{LEASE_FILE} "
                f"({type(err).__name__}: {err}); it expires in {self.lease_seconds:g} s",
                file=sys.stderr,
                flush=True,
            )
        self._me = None

    def _write(self) -> None:
        assert self._me is not None, "the lease is written only while held"
        data = self._me.to_json().encode()
        try:
            self.fs.pipe_file(self.path, data)
        except Exception:
            # Object stores need no directories; hierarchical ones (FTP, SFTP) do, and
            # checkpoint_dir may not exist yet at the start of a run.
            self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
            self.fs.pipe_file(self.path, data)

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_seconds / 4):
            me = self._me
            if me is None:
                return
            me.renewed = time.time()
            # A failed renewal is retried at the next beat; only a lease not renewed
            # for lease_seconds lets another run in.
            with contextlib.suppress(Exception):
                self._write()
