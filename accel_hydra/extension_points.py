"""Which of the loop's per-batch extension points a trainer class really implements.

A no-op extension point still costs a Python call on every batch. ``LoopBase.train``
asks once, at its start, which per-batch points the composed class (any mixin, any
subclass, an attribute set on the instance) overrides, and calls only those per batch.
A point counts as overridden when the function behind it is not ``LoopBase``'s own;
an override still calls ``super()``, so the chain it starts is the one the protocol
asks for.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["PER_BATCH_POINTS", "overridden_points"]

#: The extension points the loop calls on every batch or every update.
PER_BATCH_POINTS = (
    "_update_is_safe",
    "_before_optimizer_step",
    "_after_optimizer_step",
    "_is_logging_step",
    "_after_update",
)


def overridden_points(
    obj: object, base: type, names: Iterable[str] = PER_BATCH_POINTS
) -> frozenset[str]:
    """The names among ``names`` that ``obj`` implements with something else than
    ``base``'s function.

    Args:
        obj: the trainer (its class and its instance attributes are looked at).
        base: the class holding the no-op defaults (``LoopBase``).
        names: the extension points to check.

    Returns:
        The overridden names; the loop skips the calls to the others.
    """
    found = set()
    for name in names:
        bound = getattr(obj, name)
        if getattr(bound, "__func__", bound) is not getattr(base, name):
            found.add(name)
    return frozenset(found)
