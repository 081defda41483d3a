"""Process-layout helpers shared by the loop and the launcher."""

from __future__ import annotations

import atexit
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

__all__ = [
    "DistributedStepError",
    "fail_together",
    "launched_without_gpus",
    "leave_process_group_at_exit",
    "note_exit_status",
    "process_group_exists",
    "shut_down_process_group",
]

_exit_hook_registered = False
_exit_status = 0
# How long the GIL-free watchdog of a teardown waits after its own timeout.
_GIL_FREE_GRACE = 15.0


def launched_without_gpus() -> bool:
    """Whether several processes were launched (torchrun, accelerate launch) on a machine
    without GPUs.

    Accelerate only sets up a CPU process group when told ``cpu=True`` (or
    ``ACCELERATE_USE_CPU``); otherwise each process would quietly train alone. The loop
    and the launcher pass ``cpu=True`` in this case.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


class DistributedStepError(RuntimeError):
    """A step every process takes together failed on one of them; raised on all of them.

    The message names the step, the process it failed on and its error; on that
    process the original error is chained as ``__cause__``.
    """


@contextmanager
def fail_together(
    accelerator: Any, what: str, keep: tuple[type[Exception], ...] = ()
) -> Iterator[None]:
    """Run a block that may fail on some processes only; end with every process agreeing.

    Work between two collectives often runs on one process (pruning, the commit
    marker) or fails on one (its disk is full): the others would then wait in the next
    collective forever. Every process leaves the block through one exchange of what
    went wrong, which also stands in for a barrier, and raises the same error if
    anything did. One process re-raises its own error unchanged.

    Args:
        accelerator: the run's ``Accelerator`` (or ``PartialState``).
        what: the step, as the error names it (``"committing checkpoint s3://b/step_4"``).
        keep: error types raised as themselves on every process, with the failing
            process's message (``CheckpointUploadError``); others become
            :class:`DistributedStepError`.

    Raises:
        DistributedStepError: the block raised on some process (the first named).
    """
    error: Exception | None = None
    try:
        yield
    except Exception as err:
        if accelerator.num_processes == 1:
            raise
        error = err
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    mine = None if error is None else (type(error).__name__, str(error))
    reports = gather_object([mine])
    failed = [(rank, report) for rank, report in enumerate(reports) if report is not None]
    if not failed:
        return
    rank, (kind, message) = failed[0]
    for kept in keep:
        if kept.__name__ == kind:
            raise kept(message) from error
    raise DistributedStepError(
        f"{what} failed on process {rank} with {kind}: {message}; every process stopped here"
    ) from error


def process_group_exists() -> bool:
    """Whether this process is already in a ``torch.distributed`` process group."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def note_exit_status(status: int) -> None:
    """Record the status this process is about to exit with (a preemption's 143), for
    the teardown at exit to keep if it has to give up."""
    global _exit_status
    _exit_status = status


def leave_process_group_at_exit() -> None:
    """Tear the process group down at interpreter exit (once), for library users.

    The loop calls this when creating its ``Accelerator`` created the process group:
    a user's own script run under ``torchrun`` then ends like the console script,
    which calls :func:`shut_down_process_group` itself, instead of now and then
    aborting at exit. A group the user created is theirs to tear down.
    """
    global _exit_hook_registered
    if not _exit_hook_registered and process_group_exists():
        atexit.register(_leave_at_exit)
        _exit_hook_registered = True


def _leave_at_exit() -> None:
    if getattr(sys, "last_exc", None) or getattr(sys, "last_value", None):
        # An uncaught error: the other processes may be anywhere, not at their exit;
        # waiting for them would only delay a failure that is already certain.
        return
    shut_down_process_group(exit_status=_exit_status)


def shut_down_process_group(timeout: float = 60.0, exit_status: int = 0) -> None:
    """Leave the process group cleanly before the process exits.

    A gloo group still alive at interpreter exit can abort the process ("terminate
    called without an active exception") after all its work is done, turning a good
    run's exit status into a failure. Entry points call this once, at the very end,
    after the run succeeded.

    The processes meet in an all-reduce of a tensor held here, not in a barrier. In
    torch 2.6 (before pytorch/pytorch#154976), destroying a gloo group holds the GIL
    while it joins the group's worker threads, and a worker freeing a finished
    collective whose tensors Python already dropped needs the GIL: a deadlock
    (pytorch/pytorch#56297). A gloo barrier keeps a weak reference to every collective
    in flight when it starts (the loop's preemption flag, a ``gather_object``), so the
    worker frees them together with the barrier, just after it returned here and while
    the destruction began: about one teardown in seventy never returned. An all-reduce
    references only its own tensor, which stays alive here until the group is gone.
    (NCCL, which takes no CPU tensor and has no such worker threads, meets in its
    barrier.)

    If the teardown has not finished after ``timeout`` seconds (a peer that never
    arrives), this process, whose work is done and saved, says so and exits at once
    with ``exit_status`` (0: the run succeeded) instead of holding the job forever. A
    hang that holds the GIL would also stop that watch, so a watchdog of
    :mod:`faulthandler`, which needs no GIL, ends the process 15 seconds later with
    status 1 and every thread's traceback on stderr.
    """
    import faulthandler

    import torch.distributed as dist

    if not process_group_exists():
        return

    def leave() -> None:
        try:
            kept = _meet_before_leaving()
            dist.destroy_process_group()
            del kept  # only now: the group is gone
        except Exception:  # a peer already left: nothing is left to tear down together
            pass

    faulthandler.dump_traceback_later(timeout + _GIL_FREE_GRACE, exit=True)
    helper = threading.Thread(target=leave, name="accel_hydra teardown", daemon=True)
    helper.start()
    helper.join(timeout)
    if helper.is_alive():
        print(
            f"accel_hydra: leaving the process group did not finish in {timeout:.0f} s "
            "after the run ended; exiting without waiting for it",
            file=sys.stderr,
            flush=True,
        )
        sys.stdout.flush()
        os._exit(exit_status)
    faulthandler.cancel_dump_traceback_later()


def _meet_before_leaving() -> torch.Tensor | None:
    """Return once every process has arrived; the result must outlive the group.

    Over gloo (alone or beside NCCL) the processes meet in an all-reduce of a CPU
    tensor returned to the caller (see :func:`shut_down_process_group` for why not a
    barrier); a group without gloo meets in its barrier.
    """
    import torch.distributed as dist

    if "gloo" not in str(dist.get_backend()):
        dist.barrier()
        return None
    arrived = torch.ones(1)
    dist.all_reduce(arrived)
    return arrived
