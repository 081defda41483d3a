"""Progress: where training stands, in one object that is saved and restored whole.

The loop's position used to live in loose integers; a resumed epoch compared its
position with the epoch's length only after fetching a batch, and so trained one batch
too many when the checkpoint was taken on the epoch's last batch. Keeping the counters
together, and asking :meth:`Progress.epoch_done` *before* every fetch, makes the edges
of an epoch (first batch, last batch, between epochs) behave like its middle.

The counters are plain attributes, not properties: the loop updates them on every batch,
and a property would cost a Python call each time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Progress"]

_FIELDS = ("epoch", "step", "batch", "epoch_batches", "accumulated")


@dataclass(eq=True)
class Progress:
    """The training loop's counters.

    Attributes:
        epoch: epochs completed (0 during the first epoch).
        step: optimizer updates done, global (the same on every process).
        batch: batches of the current epoch done; the index of the next batch to fetch.
        epoch_batches: batches per epoch on each process (``epoch_length``, or the
            dataloader's length, agreed over processes); 0 before setup.
        accumulated: batches whose gradients wait for the next optimizer update (the
            accumulation phase); 0 right after an update and at every checkpoint.

    Example:
        >>> progress = Progress(epoch_batches=6)
        >>> progress.batch = 6
        >>> progress.epoch_done()
        True
        >>> progress.finish_epoch(); (progress.epoch, progress.batch)
        (1, 0)
    """

    epoch: int = 0
    step: int = 0
    batch: int = 0
    epoch_batches: int = 0
    accumulated: int = 0

    def epoch_done(self) -> bool:
        """Whether the current epoch has had all its batches: ask before fetching one."""
        return self.batch >= self.epoch_batches

    def finish_epoch(self) -> None:
        """Count the epoch as completed and move to the start of the next one."""
        self.epoch += 1
        self.batch = 0
        self.accumulated = 0

    def state_dict(self) -> dict[str, int]:
        """The counters as a plain dict of ints (JSON-friendly)."""
        return {name: int(getattr(self, name)) for name in _FIELDS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the counters saved by :meth:`state_dict`, checking each one.

        ``epoch_batches`` is not restored: it comes from this run's dataloader. A
        checkpoint taken inside an epoch of another length would resume at a position
        that means something else, so that is an error.

        Raises:
            ValueError: a counter is missing, not a non-negative integer, or the saved
                position does not fit this run's epochs.
        """
        values = {}
        for name in _FIELDS:
            value = state.get(name)
            if type(value) is not int or value < 0:
                raise ValueError(
                    f"progress.{name} in the checkpoint must be an integer >= 0, got "
                    f"{value!r}; the checkpoint's trainer state is damaged"
                )
            values[name] = value
        saved_total, position = values["epoch_batches"], values["batch"]
        if position > saved_total:
            raise ValueError(
                f"progress.batch={position} in the checkpoint is past its epoch of "
                f"{saved_total} batches; the checkpoint's trainer state is damaged"
            )
        if position and self.epoch_batches and saved_total != self.epoch_batches:
            raise ValueError(
                f"the checkpoint was taken at batch {position} of an epoch of {saved_total} "
                f"batches, but this run's epochs have {self.epoch_batches}; resume with the "
                "original epoch_length, batch size and number of processes, or resume from "
                "an epoch_<n> checkpoint"
            )
        self.epoch, self.step, self.batch = values["epoch"], values["step"], position
        self.accumulated = values["accumulated"]
