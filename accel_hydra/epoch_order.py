"""Accelerate's seedable shuffling order, drawn in blocks instead of sample by sample.

The loop prepares the train loader with ``use_seedable_sampler=True``, so a
``DataLoader(shuffle=True)`` gets Accelerate's ``SeedableRandomSampler``: epoch ``e``
is shuffled by a generator seeded with ``initial_seed + e``, which is what makes a
resumed run see the same batches as the original. Its ``__iter__`` is a generator
around torch's ``RandomSampler.__iter__``, itself a generator, so every sample costs
two Python frame resumptions: 128 per batch of 64, more than the rest of the loop.

:class:`BlockRandomSampler` makes exactly the same torch calls on the same generator,
in the same order and at the same moments (a permutation when the previous one is used
up), but hands each block of indices to ``itertools.chain`` as a list: one Python
frame per block, not per sample. The order is therefore the same, index for index, and
checkpoints of either sampler resume under the other. :func:`use_block_order` swaps
it in only where that equality is certain: an Accelerate ``SeedableRandomSampler`` that
owns its generator, and a torch and Accelerate whose orders match this module's on a
probe (checked once per process); anywhere else the original sampler stays.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from typing import Any

import torch
from accelerate.data_loader import SeedableRandomSampler

__all__ = ["BlockRandomSampler", "use_block_order"]

#: torch's ``RandomSampler`` draws indices with replacement 32 at a time.
_REPLACEMENT_CHUNK = 32
#: Chunks drawn per block with replacement: bounds the memory of a block (torch's own
#: sampler holds a whole permutation without replacement) while keeping frames rare.
_CHUNKS_PER_BLOCK = 1024


class BlockRandomSampler(SeedableRandomSampler):
    """A ``SeedableRandomSampler`` that yields its order without a frame per sample.

    Epoch ``e`` draws from a generator seeded with ``initial_seed + e`` exactly what
    ``SeedableRandomSampler`` draws: without replacement one ``randperm`` per
    ``len(data_source)`` samples, the last one cut to ``num_samples % n``; with
    replacement ``randint`` chunks of 32 and a shorter last chunk. When the order is
    used up the sampler moves to the next epoch, as the original does (Accelerate's
    dataloader sets the epoch again before every iteration, so this only matters to
    code that iterates the sampler itself).

    Build it with :func:`use_block_order`, which copies the state of the sampler it
    replaces; on its own it takes ``SeedableRandomSampler``'s arguments.

    Example:
        >>> sampler = BlockRandomSampler(range(5), data_seed=3)
        >>> sorted(sampler)
        [0, 1, 2, 3, 4]
        >>> sampler.epoch
        1
    """

    generator: torch.Generator | None

    def __iter__(self) -> Iterator[int]:
        return itertools.chain.from_iterable(self._blocks())

    def _blocks(self) -> Iterator[list[int]]:
        # A generator, so nothing is drawn before the first index is asked for: the
        # original draws at that moment too.
        if self.generator is None:
            device = torch.get_default_device() if hasattr(torch, "get_default_device") else "cpu"
            self.generator = torch.Generator(device=device)
        generator = self.generator
        generator.manual_seed(self.epoch + self.initial_seed)
        n = len(self.data_source)
        total = self.num_samples
        if self.replacement:
            full_chunks, last = divmod(total, _REPLACEMENT_CHUNK)
            for start in range(0, full_chunks, _CHUNKS_PER_BLOCK):
                draws = [
                    torch.randint(
                        high=n, size=(_REPLACEMENT_CHUNK,), dtype=torch.int64, generator=generator
                    )
                    for _ in range(min(_CHUNKS_PER_BLOCK, full_chunks - start))
                ]
                yield torch.cat(draws).tolist()
            # Drawn even when empty, as the original does.
            yield torch.randint(
                high=n, size=(last,), dtype=torch.int64, generator=generator
            ).tolist()
        else:
            for _ in range(total // n):
                yield torch.randperm(n, generator=generator).tolist()
            # Drawn even when nothing of it is used, as the original does.
            yield torch.randperm(n, generator=generator).tolist()[: total % n]
        self.set_epoch(self.epoch + 1)


def use_block_order(dataloader: Any) -> bool:
    """Replace a prepared dataloader's ``SeedableRandomSampler`` by a
    :class:`BlockRandomSampler` with the same state; return whether it did.

    It does nothing (and returns ``False``) unless the order is certain to stay the
    same: the sampler must be exactly Accelerate's ``SeedableRandomSampler`` (a
    subclass may draw differently), not iterated yet and without a generator of the
    user's (the original draws from a shared generator lazily, between other users'
    draws; a block drawn at once could change both), and the installed torch and
    Accelerate must give this module's order on a probe.

    Args:
        dataloader: a dataloader returned by ``Accelerator.prepare``; it is changed in
            place (Accelerate's ``set_sampler`` puts the new sampler everywhere the old
            one was referenced, sharded batch samplers included).

    Returns:
        True when the sampler was replaced.
    """
    get_sampler = getattr(dataloader, "get_sampler", None)
    set_sampler = getattr(dataloader, "set_sampler", None)
    if get_sampler is None or set_sampler is None:
        return False
    sampler = get_sampler()
    if type(sampler) is not SeedableRandomSampler or sampler.generator is not None:
        return False
    if not _orders_match():
        return False
    replacement = BlockRandomSampler.__new__(BlockRandomSampler)
    replacement.__dict__.update(vars(sampler))
    set_sampler(replacement)
    if get_sampler() is not replacement:  # an Accelerate that stores it elsewhere
        set_sampler(sampler)
        return False
    return True


#: ``(len(data_source), num_samples, replacement)`` of the probe: full permutations,
#: a cut last one, several of them, fewer samples, chunks of 32 and a short tail.
_PROBES = ((7, None, False), (7, 17, False), (7, 3, False), (1, 2, False), (5, 70, True))


@functools.cache
def _orders_match() -> bool:
    """Whether this module and the installed ``SeedableRandomSampler`` give the same
    orders on the probe, including the epoch advance (once per process)."""
    try:
        for n, num_samples, replacement in _PROBES:
            for epoch in (0, 3):
                orders = []
                for cls in (SeedableRandomSampler, BlockRandomSampler):
                    sampler = cls(
                        range(n), replacement=replacement, num_samples=num_samples, data_seed=11
                    )
                    sampler.set_epoch(epoch)
                    orders.append((list(sampler), sampler.epoch))
                if orders[0] != orders[1]:
                    return False
    except Exception:  # an Accelerate whose sampler takes other arguments: keep it
        return False
    return True
