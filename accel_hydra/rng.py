"""Snapshots of every random number generator the loop's work draws from.

Accelerate saves and restores these in checkpoints. The loop needs its own snapshot
for one moment: on a mid-epoch resume, the epoch's data iterator is created after
the restore, and creating it draws a seed from the global torch RNG. Re-applying the
restored states once the iterator exists puts dropout and every other draw back on
the uninterrupted run's stream.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_state", "restore_rng_state"]


def capture_rng_state() -> dict[str, Any]:
    """The current states of Python's, NumPy's and torch's (CPU and CUDA) generators."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Put every generator back to ``state`` (from :func:`capture_rng_state`)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
