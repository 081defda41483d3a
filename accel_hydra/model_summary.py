"""The model table of the start summary: parameters per top-level module.

A first look at a run should answer "did I freeze what I meant to, and where are the
parameters?" without a debugger: one row per named child of the model, with its
trainable and frozen parameter counts, and the total.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["module_table"]

#: Children listed one by one; the rest share a row (a model of 100 blocks stays short).
MAX_ROWS = 20


def module_table(model: torch.nn.Module, max_rows: int = MAX_ROWS) -> list[str]:
    """Aligned text rows: a header, one row per top-level module, then the total.

    Parameters the model holds itself (not in a child) get a ``(own)`` row; a
    parameter shared by two children counts in both rows and once in the total.

    Example:
        >>> rows = module_table(torch.nn.Sequential(torch.nn.Linear(2, 3)))
        >>> print("\\n".join(rows))
        module  type    trainable  frozen
        0       Linear          9       0
        total                   9       0
    """
    rows = []
    for name, child in model.named_children():
        rows.append((name, type(child).__name__, *_counts(child.parameters())))
    own = _counts(model.parameters(recurse=False))
    if any(own):
        rows.append(("(own)", type(model).__name__, *own))
    if len(rows) > max_rows:
        rest = rows[max_rows - 1 :]
        more = (sum(r[2] for r in rest), sum(r[3] for r in rest))
        rows = [*rows[: max_rows - 1], (f"... {len(rest)} more", "", *more)]
    rows.append(("total", "", *_counts(model.parameters())))
    table = [("module", "type", "trainable", "frozen")]
    table += [(name, kind, f"{train:,}", f"{frozen:,}") for name, kind, train, frozen in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    return [
        f"{name.ljust(widths[0])}  {kind.ljust(widths[1])}  "
        f"{trainable.rjust(widths[2])}  {frozen.rjust(widths[3])}"
        for name, kind, trainable, frozen in table
    ]


def _counts(parameters: Iterable[torch.nn.Parameter]) -> tuple[int, int]:
    trainable = frozen = 0
    for parameter in parameters:  # parameters() yields a shared tensor once
        if parameter.requires_grad:
            trainable += parameter.numel()
        else:
            frozen += parameter.numel()
    return trainable, frozen
