"""Say in one line how a checkpoint does not fit a model.

``load_state_dict`` reports every mismatched tensor on a line of its own: thousands
of lines for a real model, repeated for every checkpoint tried. A checkpoint that
does not fit the model is a setting to change, not damaged bytes, so one short line
(the first few tensors and a count) says all a person needs.
"""

from __future__ import annotations

import re

__all__ = ["CheckpointMismatchError", "describe_mismatch"]

_SHOWN = 3
_SIZE = re.compile(
    r"size mismatch for ([^:]+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from "
    r"checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)"
)
_KEYS = re.compile(r"(Missing|Unexpected) key\(s\) in state_dict: ([^\n]*)")


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tensors do not fit the model (other shapes, other names)."""


def describe_mismatch(error: BaseException) -> str | None:
    """A one-line summary of a ``load_state_dict`` mismatch in ``error``, else None.

    Example:
        >>> describe_mismatch(RuntimeError("size mismatch for w: copying a param with "
        ...     "shape torch.Size([8, 4]) from checkpoint, the shape in current model is "
        ...     "torch.Size([16, 4])."))
        '1 tensor differs in shape: w (checkpoint [8, 4], model [16, 4])'
    """
    text = str(error)
    parts = []
    sizes = _SIZE.findall(text)
    if sizes:
        shown = [f"{name} (checkpoint [{saved}], model [{now}])" for name, saved, now in sizes]
        parts.append(
            f"{_count(len(sizes), 'tensor differs', 'tensors differ')} in shape: " + _first(shown)
        )
    for kind, keys in _KEYS.findall(text):
        names = re.findall(r'"([^"]+)"', keys)
        where = "missing from the checkpoint" if kind == "Missing" else "not in the model"
        parts.append(f"{_count(len(names), 'tensor', 'tensors')} {where}: " + _first(names))
    return "; ".join(parts) or None


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _first(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")
