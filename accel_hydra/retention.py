"""Retention policy: which committed checkpoints a run may delete.

Pure functions over checkpoint names and their progress records, so the rules
(keep the newest k, never touch ``best`` or permanent ones) are unit-tested apart
from any filesystem.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Any

__all__ = ["ROTATING_NAME", "checkpoint_order", "checkpoints_to_prune"]

#: Names that ``save_last_k`` rotates. ``best`` and ``permanent_step_<n>`` never match.
ROTATING_NAME = re.compile(r"^(step|epoch)_\d+$")


def checkpoint_order(name: str, info: Mapping[str, Any]) -> tuple[int, int, int]:
    """Sort key putting the checkpoint with the most training progress last.

    Progress is the update step, then the epoch (an epoch-end checkpoint follows a
    step checkpoint taken at the same update), never the name or a modification time.
    On a tie a rotating checkpoint wins over ``best``, which only copies one.
    """
    return (int(info["step"]), int(info["epoch"]), 1 if ROTATING_NAME.match(name) else 0)


def checkpoints_to_prune(
    committed: Mapping[str, Mapping[str, Any]],
    keep_last_k: int | None,
    protected: Collection[str] = (),
    newest: str | None = None,
) -> list[str]:
    """Names to delete so that only the newest ``keep_last_k`` rotating checkpoints remain.

    Args:
        committed: committed checkpoint name -> its progress record (``step``, ``epoch``).
        keep_last_k: how many ``step_*``/``epoch_*`` checkpoints to keep; ``None`` keeps all.
        protected: names never deleted (for example the checkpoint this run resumed from).
        newest: the checkpoint just saved. Checkpoints with more progress than it come
            from a timeline the run abandoned by resuming from an earlier one: they
            neither count towards ``keep_last_k`` nor get deleted here (the run
            overwrites them as it reaches them again).

    Returns:
        The names to delete, oldest first.
    """
    if keep_last_k is None:
        return []
    limit = None
    if newest is not None and newest in committed:
        limit = checkpoint_order(newest, committed[newest])
    rotating = sorted(
        (
            name
            for name in committed
            if ROTATING_NAME.match(name)
            and (limit is None or checkpoint_order(name, committed[name]) <= limit)
        ),
        key=lambda name: checkpoint_order(name, committed[name]),
    )
    stale = rotating[: max(len(rotating) - keep_last_k, 0)]
    return [name for name in stale if name not in protected]
