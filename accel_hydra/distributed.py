"""Process-layout helpers shared by the loop and the launcher."""

from __future__ import annotations

import os
import sys
import threading

import torch

__all__ = ["launched_without_gpus", "shut_down_process_group"]


def launched_without_gpus() -> bool:
    """Whether several processes were launched (torchrun, accelerate launch) on a machine
    without GPUs.

    Accelerate only sets up a CPU process group when told ``cpu=True`` (or
    ``ACCELERATE_USE_CPU``); otherwise each process would quietly train alone. The loop
    and the launcher pass ``cpu=True`` in this case.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def shut_down_process_group(timeout: float = 60.0) -> None:
    """Leave the process group cleanly before the process exits.

    A gloo group still alive at interpreter exit can abort the process ("terminate
    called without an active exception") after all its work is done, turning a good
    run's exit status into a failure. Entry points call this once, at the very end,
    after the run succeeded.

    The teardown itself now and then never returns (pytorch/pytorch#75097). It runs on
    a helper thread; if it has not finished after ``timeout`` seconds, this process,
    whose work is done and saved, says so and exits at once with status 0 instead of
    holding the job forever.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return

    def leave() -> None:
        try:
            dist.barrier()
            dist.destroy_process_group()
        except Exception:  # a peer already left: nothing is left to tear down together
            pass

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
        os._exit(0)
