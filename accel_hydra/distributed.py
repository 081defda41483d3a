"""Process-layout helpers shared by the loop and the launcher."""

from __future__ import annotations

import os

import torch

__all__ = ["launched_without_gpus"]


def launched_without_gpus() -> bool:
    """Whether several processes were launched (torchrun, accelerate launch) on a machine
    without GPUs.

    Accelerate only sets up a CPU process group when told ``cpu=True`` (or
    ``ACCELERATE_USE_CPU``); otherwise each process would quietly train alone. The loop
    and the launcher pass ``cpu=True`` in this case.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
