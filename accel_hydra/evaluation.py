"""Collecting what an evaluation produced: prepared loaders and gathered outputs.

``LoopBase.validate``, ``test`` and ``predict`` run the model on a loader outside
training. This module holds the parts that need no trainer: preparing an extra loader
so that Accelerate's padding can be dropped again, and putting per-batch outputs
(tensors, or dicts, tuples and lists of them) back together in dataset order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from accelerate import Accelerator

__all__ = ["concatenate_outputs", "outputs_to_cpu", "prepare_eval_loader"]


def prepare_eval_loader(accelerator: Accelerator, dataloader: Iterable) -> Iterable:
    """Shard ``dataloader`` over the processes for an evaluation; one already prepared
    is returned as it is.

    Prepared with ``even_batches=True`` whatever the run uses: every process then runs
    the same number of batches (a collective per batch cannot hang), and
    ``gather_for_metrics`` knows exactly which samples of the last batch are padding.
    The loader is kept out of the accelerator's own list, so ``save_state`` writes the
    same files with or without an evaluation in between.
    """
    if getattr(dataloader, "_is_accelerate_prepared", False):
        return dataloader
    even = accelerator.even_batches
    accelerator.even_batches = True
    try:
        prepared = accelerator.prepare_data_loader(dataloader)
    finally:
        accelerator.even_batches = even
    registered = getattr(accelerator, "_dataloaders", None)
    if isinstance(registered, list) and registered and registered[-1] is prepared:
        registered.pop()
    return prepared


def outputs_to_cpu(output: Any) -> Any:
    """``output`` with every tensor in it (nested in dicts, tuples, lists) moved to CPU."""
    if isinstance(output, torch.Tensor):
        return output.detach().cpu()
    if isinstance(output, Mapping):
        return type(output)({k: outputs_to_cpu(v) for k, v in output.items()})  # type: ignore[call-arg]
    if isinstance(output, tuple) and hasattr(output, "_fields"):  # a namedtuple
        return type(output)(*(outputs_to_cpu(v) for v in output))
    if isinstance(output, tuple | list):
        return type(output)(outputs_to_cpu(v) for v in output)
    return output


def concatenate_outputs(outputs: list[Any]) -> Any:
    """Join per-batch outputs into one, along the batch dimension.

    Tensors are concatenated along dim 0; dicts and tuples (namedtuples too) are joined
    per key or position, keeping their type; a list holding tensors is joined per
    position like a tuple, any other list (strings, ids gathered as objects) is
    extended. ``None`` when there was no batch.

    Raises:
        TypeError: the batches' outputs differ in structure (say, a dict with other keys).
    """
    if not outputs:
        return None
    first = outputs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat([_same_kind(o, torch.Tensor) for o in outputs], dim=0)
    if isinstance(first, Mapping):
        keys = list(first)
        for output in outputs:
            if list(_same_kind(output, Mapping)) != keys:
                raise TypeError(
                    f"predict_step returned dicts with different keys ({keys} then "
                    f"{list(output)}); return the same keys for every batch"
                )
        joined = {k: concatenate_outputs([o[k] for o in outputs]) for k in keys}
        return type(first)(joined)  # type: ignore[call-arg]
    if isinstance(first, tuple) or (isinstance(first, list) and _holds_tensors(first)):
        width = len(first)
        for output in outputs:
            if len(_same_kind(output, tuple | list)) != width:
                raise TypeError(
                    f"predict_step returned sequences of {width} and {len(output)} items; "
                    "return the same structure for every batch"
                )
        parts = [concatenate_outputs([o[i] for o in outputs]) for i in range(width)]
        if hasattr(first, "_fields"):
            return type(first)(*parts)
        return type(first)(parts)
    if isinstance(first, list):
        return [item for output in outputs for item in _same_kind(output, list)]
    return outputs


def _holds_tensors(items: list[Any]) -> bool:
    return any(isinstance(v, torch.Tensor | Mapping | tuple) for v in items)


def _same_kind(output: Any, kind: Any) -> Any:
    if not isinstance(output, kind):
        raise TypeError(
            f"predict_step returned a {type(output).__name__} after a "
            f"{getattr(kind, '__name__', kind)}; return the same structure for every batch"
        )
    return output
