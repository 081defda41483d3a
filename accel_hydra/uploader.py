"""BackgroundUploader: run one checkpoint upload at a time on a background thread.

Training hands a finished local stage to the uploader and goes on; the network is
slow, the GPUs should not wait for it. At most one upload is in flight: handing over
the next one first waits for the previous one, so checkpoints reach the store (and get
pruned) in the order they were saved and a stage still uploading is never rewritten.
A failed upload is retried with backoff; if it still fails, the error is raised at the
next hand-over or :meth:`BackgroundUploader.wait`, never dropped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

__all__ = ["BackgroundUploader", "CheckpointUploadError"]


class CheckpointUploadError(RuntimeError):
    """An upload failed after every retry; the message names the URL and the local copy."""


class BackgroundUploader:
    """Run upload jobs one after another on a daemon thread, with retries.

    Args:
        retry_delays: seconds to wait before each retry; its length is the number of
            retries. The default (1 s, 4 s, 16 s) rides out a throttled or restarting
            endpoint without hiding a dead one for long.

    Example:
        >>> uploader = BackgroundUploader()
        >>> uploader.submit(lambda: None, "memory://run/step_10")
        >>> uploader.wait()  # raises CheckpointUploadError if the job kept failing
    """

    def __init__(self, retry_delays: Sequence[float] = (1.0, 4.0, 16.0)) -> None:
        self.retry_delays = tuple(retry_delays)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._running: str | None = None

    @property
    def in_flight(self) -> str | None:
        """Where the upload now running goes, or ``None`` when idle."""
        return self._running

    def submit(
        self,
        job: Callable[[], None],
        target: str,
        on_failure: str = "",
        after: Callable[[], None] | None = None,
    ) -> None:
        """Start ``job`` in the background once the previous one is done.

        Args:
            job: uploads and commits one checkpoint; retried as a whole when it raises,
                so it must be safe to run again.
            target: the URL the job writes to, named in the error if it fails.
            on_failure: a sentence added to the error (for example where the local
                copy is kept).
            after: run once after ``job`` succeeded, not retried (pruning).

        Raises:
            CheckpointUploadError: the *previous* upload failed.
        """
        self.wait()
        self._running = target
        self._thread = threading.Thread(
            target=self._run,
            args=(job, target, on_failure, after),
            name=f"accel_hydra upload {target}",
            daemon=True,
        )
        self._thread.start()

    def wait(self) -> None:
        """Block until no upload is in flight.

        Raises:
            CheckpointUploadError: the last upload failed after every retry.
        """
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self, job: Callable, target: str, on_failure: str, after: Callable | None) -> None:
        try:
            for attempt, delay in enumerate((*self.retry_delays, None)):
                try:
                    job()
                    break
                except Exception as err:
                    if delay is None:
                        tries = attempt + 1
                        raise CheckpointUploadError(
                            f"upload of checkpoint {target} failed {tries} time(s), last with "
                            f"{type(err).__name__}: {err}. {on_failure}".strip()
                        ) from err
                    time.sleep(delay)
            if after is not None:
                after()
        except BaseException as err:
            self._error = err
        finally:
            self._running = None
