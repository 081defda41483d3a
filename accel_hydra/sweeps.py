"""Sweep expansion: ``optimizer.lr=1e-3,1e-2 seed=range(0,2)`` -> one override list per job.

Parsing uses Hydra's own override grammar (choices, ``range()``, quoting), and jobs are
the cartesian product of the swept values in the order they were written, like Hydra's
basic sweeper; the jobs then run one after another.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

__all__ = ["expand_sweeps"]


def expand_sweeps(overrides: Sequence[str]) -> list[list[str]]:
    """Every combination of the swept overrides, each with the plain ones kept as written.

    Raises:
        ValueError: an override cannot be parsed, or sweeps a way we cannot expand
            (``glob()`` needs a config group listing).
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
        choices = [
            [f"{o.get_key_element()}={value}" for value in o.sweep_string_iterator()]
            if o.is_sweep_override()
            else [o.input_line]
            for o in parsed
        ]
    except HydraException as err:
        reason = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
        raise ValueError(f"cannot expand the sweep {list(overrides)}: {reason}") from None
    return [list(job) for job in itertools.product(*choices)]
