"""TensorBoard event files written when an event is logged, and flushed at once.

tensorboardX (2.6) hands every event to a worker thread through a
``multiprocessing.Queue``: a feeder thread pickles it into a pipe, the worker
unpickles and writes it. For a trainer that logs a few scalars every few dozen
updates this buys nothing and costs plenty: the two threads take the GIL from the
training thread for every event, and ``flush()`` only flushes what the worker has
already written, so making the file complete before a checkpoint meant stopping and
restarting the worker (milliseconds per checkpoint).

:func:`write_directly` swaps each file writer's queue for a writer that appends the
event to the file on the calling thread (tensorboardX's own ``EventsWriter``: the
same records, in the same order, in the same file); ``flush()`` then hands every
event logged so far to the operating system, at once. A tensorboardX built another
way is left as it is, and :func:`flush_event_files` drains its queue the slow way.
"""

from __future__ import annotations

import functools
import re
from typing import Any

__all__ = ["DirectEventWriter", "add_scalar", "flush_event_files", "write_directly"]

#: What tensorboardX replaces by ``_`` in a tag (it also strips leading slashes).
_ILLEGAL_IN_TAG = re.compile(r"[^-/\w.]")


class DirectEventWriter:
    """Stands in for tensorboardX's ``EventFileWriter``: the same methods, no queue.

    Args:
        events: the ``EventsWriter`` (one open event file) to append to.
        logdir: the directory of that file.
    """

    def __init__(self, events: Any, logdir: str) -> None:
        self._events = events
        self._logdir = logdir
        self._closed = False

    def get_logdir(self) -> str:
        return self._logdir

    def add_event(self, event: Any) -> None:
        if not self._closed:
            self._events.write_event(event)

    def flush(self) -> None:
        """Hand every event written so far to the operating system.

        A killed process then loses none of them. tensorboardX's own flush also
        fsyncs, which costs the training thread a millisecond or more at every
        checkpoint and guards only against a crash of the whole machine; that fsync
        happens at :meth:`close`, and the kernel writes the file back within seconds
        anyway (the checkpoints themselves are always fsynced)."""
        if self._closed:
            return
        file = getattr(getattr(self._events, "_py_recordio_writer", None), "_writer", None)
        lock = getattr(self._events, "_lock", None)
        if file is None or lock is None or not hasattr(file, "flush"):
            self._events.flush()
            return
        with lock:
            file.flush()

    def close(self) -> None:
        """Flush, fsync and close the file."""
        if not self._closed:
            self._closed = True
            self._events.close()

    def reopen(self) -> None:
        """A closed file stays closed (``SummaryWriter`` opens a new file writer)."""


def write_directly(writer: Any) -> None:
    """Make every file writer of the tensorboardX ``writer`` write on the caller's
    thread. Events already queued are written first, in order."""
    for file_writer in (getattr(writer, "all_writers", None) or {}).values():
        queued: Any = getattr(file_writer, "event_writer", None)
        if not _is_queued_writer(queued):
            continue
        queued._worker.stop()  # the stop signal travels behind every queued event
        queued._closed = True  # inert from here on; its file now belongs to us
        queued._event_queue.close()
        file_writer.event_writer = DirectEventWriter(queued._ev_writer, queued.get_logdir())


def add_scalar(writer: Any, tag: str, value: Any, step: int | None) -> None:
    """Write what ``writer.add_scalar(tag, value, global_step=step)`` writes.

    For a plain ``float`` or ``int`` into a writer :func:`write_directly` converted,
    the event is built here: tensorboardX turns every value into a NumPy array and
    sums it to warn about NaN, most of the cost of a scalar. The tag is cleaned the
    way tensorboardX cleans it. Anything else goes through ``add_scalar`` itself.
    """
    file_writer = getattr(writer, "file_writer", None)
    if type(value) not in (float, int) or not isinstance(
        getattr(file_writer, "event_writer", None), DirectEventWriter
    ):
        writer.add_scalar(tag, value, global_step=step)
        return
    summary = _summary_type()
    clean = _ILLEGAL_IN_TAG.sub("_", tag).lstrip("/")
    file_writer.add_summary(  # type: ignore[union-attr]
        summary(value=[summary.Value(tag=clean, simple_value=float(value))]), step
    )


@functools.cache
def _summary_type() -> Any:
    """tensorboardX's ``Summary`` message, imported on the first scalar (the import
    of ``accel_hydra`` stays free of tensorboardX)."""
    from tensorboardX.proto.summary_pb2 import Summary

    return Summary


def flush_event_files(writer: Any) -> None:
    """Write every event logged so far to disk, then flush: what ``flush()`` promises.

    Immediate for the writers :func:`write_directly` converted. A queued writer's
    ``flush()`` only flushes what its worker thread has already written: an event
    logged just before a checkpoint could still be in the queue, and a run killed
    later lost it although the checkpoint after it was committed (the resumed run then
    starts logging after it). So its worker is stopped first, which drains the queue
    in order, and a new worker takes over the same file.
    """
    for file_writer in (getattr(writer, "all_writers", None) or {}).values():
        events: Any = getattr(file_writer, "event_writer", None)
        if not _is_queued_writer(events):
            continue
        worker = events._worker
        worker.stop()
        events._worker = type(worker)(events._event_queue, events._ev_writer, events._flush_secs)
        events._worker.start()
    writer.flush()


def _is_queued_writer(events: Any) -> bool:
    """Whether ``events`` is an open tensorboardX ``EventFileWriter`` as 2.6 builds it."""
    worker = getattr(events, "_worker", None)
    return (
        worker is not None
        and hasattr(worker, "stop")
        and not getattr(events, "_closed", True)
        and all(hasattr(events, name) for name in ("_event_queue", "_ev_writer", "_flush_secs"))
        and hasattr(events, "get_logdir")
    )
