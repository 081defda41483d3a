"""Process-layout helpers shared by the loop and the launcher."""

from __future__ import annotations

import os

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


def shut_down_process_group() -> None:
    """Leave the process group cleanly before the process exits.

    A gloo group still alive at interpreter exit can abort the process ("terminate
    called without an active exception") after all its work is done, turning a good
    run's exit status into a failure. Entry points call this once, at the very end.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
