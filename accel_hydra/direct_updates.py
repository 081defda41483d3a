"""When the loop may skip Accelerate's per-step wrappers and call torch directly.

On one process without mixed precision, Accelerate's per-step wrappers add Python
work and change nothing:

* ``accelerator.accumulate(model)`` only counts batches to decide ``sync_gradients``
  (there is no DDP ``no_sync`` to enter);
* ``accelerator.backward(loss)`` divides the loss by the accumulation steps (a tensor
  op even when that is 1) and calls ``loss.backward()``;
* ``AcceleratedOptimizer.step``/``zero_grad`` call the wrapped optimizer when
  gradients sync (and look for optional packages on every call to do so);
* ``accelerator.clip_grad_norm_``/``clip_grad_value_`` unscale nothing (no grad
  scaler) and call ``torch.nn.utils``.

On a tiny model those wrappers cost more than half of a step (see
``benchmarks/overhead.py``). When :func:`direct_updates_are_exact` holds, the loop does
the same arithmetic itself, with the same sync decisions, and keeps
``accelerator.sync_gradients`` and ``accelerator.step`` as Accelerate would have set
them. The prepared dataloader (sampler, device placement, end-of-epoch tracking) is
used either way. Everywhere else (several processes, DDP/FSDP/DeepSpeed, XLA, mixed
precision, custom accumulation plugins) Accelerate's machinery runs as it is.
``tests/test_direct_updates.py`` checks that both paths produce bitwise-equal
parameters and optimizer states.
"""

from __future__ import annotations

from typing import Any

from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.utils import DistributedType

__all__ = ["direct_updates_are_exact"]


def direct_updates_are_exact(
    accelerator: Accelerator, optimizer: Any, accumulation_steps: int
) -> bool:
    """Whether calling torch directly gives exactly what Accelerate's wrappers give.

    Args:
        accelerator: the prepared accelerator.
        optimizer: the optimizer as ``accelerator.prepare`` returned it.
        accumulation_steps: the batches per update the loop counts with.
    """
    gradient_state = accelerator.gradient_state
    plugin = gradient_state.plugin_kwargs
    return (
        accelerator.num_processes == 1
        and accelerator.distributed_type == DistributedType.NO
        and accelerator.mixed_precision == "no"
        and accelerator.scaler is None
        and not getattr(accelerator, "has_lomo_optimizer", False)
        # Exactly one optimizer, the one the loop steps, wrapped once, without a scaler.
        and len(accelerator._optimizers) == 1
        and accelerator._optimizers[0] is optimizer
        and type(optimizer) is AcceleratedOptimizer
        and optimizer.scaler is None
        and accelerator.gradient_accumulation_steps == accumulation_steps
        # The default accumulation rules: sync every N batches and at the epoch's end.
        and plugin.get("sync_with_dataloader", True)
        and not plugin.get("sync_each_batch", False)
    )
