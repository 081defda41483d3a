"""BackgroundUploader: run one checkpoint upload at a time on a background thread.

Training hands a finished local stage to the uploader and goes on; the network is
slow, the GPUs should not wait for it. At most one upload is in flight: handing over
the next one first waits for the previous one, so checkpoints reach the store (and get
pruned) in the order they were saved and a stage still uploading is never rewritten.
A failed upload is retried with backoff; if it still fails, the error is raised at the
next hand-over or :meth:`BackgroundUploader.wait`, never dropped.

Every wait is bounded. The store's requests carry their own timeouts; on top of that
an upload that shows no sign of life for ``stall_timeout`` seconds (no bytes sent, no
new attempt) is given up, and a caller may give up earlier (after a preemption
signal). The upload thread is a daemon, so a given-up upload never keeps the process
alive; waiting happens in short slices, so signal handlers run meanwhile.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

from fsspec.callbacks import Callback

__all__ = ["BackgroundUploader", "CheckpointUploadError", "UploadProgress"]

#: Seconds between two looks at an upload in flight: how late a signal handler may run.
_WAIT_SLICE = 0.1


class CheckpointUploadError(RuntimeError):
    """An upload failed after every retry; the message names the URL and the local copy."""


class UploadProgress(Callback):
    """An fsspec callback that records when the upload last moved (bytes or files).

    Pass it as ``callback=`` to ``fs.put``; child transfers share it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.last = time.monotonic()

    def call(self, *args: object, **kwargs: object) -> None:
        self.last = time.monotonic()

    def branched(self, path_1: str, path_2: str, **kwargs: object) -> UploadProgress:
        return self


class _Job:
    """One upload: what it does, where to, and how it ended."""

    def __init__(
        self,
        job: Callable,
        target: str,
        on_failure: str,
        after: Callable | None,
        progress: UploadProgress | None,
        retry: bool = True,
    ):
        self.job, self.target, self.on_failure, self.after = job, target, on_failure, after
        self.retry = retry
        self.progress = progress or UploadProgress()
        self.error: BaseException | None = None
        self.abandoned = threading.Event()
        self.thread: threading.Thread  # set by BackgroundUploader.submit


class BackgroundUploader:
    """Run upload jobs one after another on a daemon thread, with retries.

    Args:
        retry_delays: seconds to wait before each retry; its length is the number of
            retries. The default (1 s, 4 s, 16 s) rides out a throttled or restarting
            endpoint without hiding a dead one for long.
        stall_timeout: give up an upload that showed no progress (no bytes sent, no
            new attempt started) for this many seconds; ``None`` waits as long as the
            job runs. Retry delays do not count as a stall.

    Example:
        >>> uploader = BackgroundUploader()
        >>> uploader.submit(lambda: None, "memory://run/step_10")
        >>> uploader.wait()  # raises CheckpointUploadError if the job kept failing
    """

    def __init__(
        self,
        retry_delays: Sequence[float] = (1.0, 4.0, 16.0),
        stall_timeout: float | None = None,
    ) -> None:
        self.retry_delays = tuple(retry_delays)
        self.stall_timeout = stall_timeout
        self._job: _Job | None = None

    @property
    def in_flight(self) -> str | None:
        """Where the upload now running goes, or ``None`` when idle."""
        job = self._job
        return job.target if job is not None and job.thread.is_alive() else None

    def submit(
        self,
        job: Callable[[], None],
        target: str,
        on_failure: str = "",
        after: Callable[[], None] | None = None,
        progress: UploadProgress | None = None,
        retry: bool = True,
    ) -> None:
        """Start ``job`` in the background once the previous one is done.

        Args:
            job: uploads and commits one checkpoint; retried as a whole when it
                raises, so it must be safe to run again.
            target: the URL the job writes to, named in the error if it fails.
            on_failure: a sentence added to the error (for example where the local
                copy is kept).
            after: run once after ``job`` succeeded, not retried (pruning).
            progress: the callback ``job`` hands to fsspec (``callback=``), so that a
                long upload that still moves is not taken for a stalled one.
            retry: False runs ``job`` once (a local save: its failure, a full disk,
                would only repeat).

        Raises:
            CheckpointUploadError: the *previous* upload failed.
        """
        self.wait()
        running = _Job(job, target, on_failure, after, progress, retry)
        running.thread = threading.Thread(
            target=self._run, args=(running,), name=f"accel_hydra upload {target}", daemon=True
        )
        self._job = running
        running.thread.start()

    def wait(self, give_up: Callable[[], str | None] | None = None) -> None:
        """Block until no upload is in flight, or until it is given up.

        Args:
            give_up: asked between short slices of waiting; a sentence (why) gives the
                upload up, ``None`` waits on. Signal handlers run between slices.

        Raises:
            CheckpointUploadError: the last upload failed after every retry, stalled
                for ``stall_timeout``, or was given up; the message names the URL and
                the ``on_failure`` sentence.
        """
        job = self._job
        if job is None:
            return
        while job.thread.is_alive():
            job.thread.join(_WAIT_SLICE)
            if not job.thread.is_alive():
                break
            reason = give_up() if give_up is not None else None
            silent = time.monotonic() - job.progress.last
            if reason is None and self.stall_timeout is not None and silent > self.stall_timeout:
                reason = f"no progress for {silent:.0f} s (stall_timeout {self.stall_timeout:g} s)"
            if reason is not None:
                job.abandoned.set()
                self._job = None
                raise CheckpointUploadError(
                    f"upload of checkpoint {job.target} did not finish: {reason}. "
                    f"{job.on_failure}".strip()
                )
        self._job = None
        if job.error is not None:
            raise job.error

    def _run(self, job: _Job) -> None:
        try:
            delays = self.retry_delays if job.retry else ()
            for attempt, delay in enumerate((*delays, None)):
                try:
                    job.progress.call()
                    job.job()
                    break
                except Exception as err:
                    if delay is not None:
                        # Waiting to retry is not a stall; a given-up job stops retrying.
                        job.progress.last = time.monotonic() + delay
                        if not job.abandoned.wait(delay):
                            continue
                    raise CheckpointUploadError(
                        f"upload of checkpoint {job.target} failed {attempt + 1} time(s), "
                        f"last with {type(err).__name__}: {err}. {job.on_failure}".strip()
                    ) from err
            if job.after is not None and not job.abandoned.is_set():
                job.after()
        except BaseException as err:
            job.error = err
