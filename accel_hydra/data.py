"""Batching tools for variable-length data: a padding collate and a bucketed batch sampler.

Speech, audio and text samples differ in length. Batching samples of similar length
wastes little compute on padding (:class:`BucketBatchSampler`), and
:class:`PaddingCollate` pads what is left and says where the real data ends.

The sampler is built for the loop's exact resume: its batches of epoch ``e`` depend
only on ``(seed, e)``, so a run resumed mid-epoch skips the batches already trained by
index and then sees the very batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["BucketBatchSampler", "EpochSeed", "PaddingCollate"]


class PaddingCollate:
    """Collate a list of dict samples, padding the named fields to the batch's longest.

    For each padded field ``key`` the batch also holds ``key_lengths`` (int64, the true
    length of every sample) and ``key_mask`` (bool, ``True`` on real positions), so a
    model can ignore the padding. Other fields are stacked when they are tensors,
    arrays or numbers, and kept as lists otherwise (file names, text).

    Args:
        pad_keys: the fields to pad along their first dimension.
        padding_value: the value written into padded positions.

    Example:
        >>> collate = PaddingCollate(pad_keys=["tokens"])
        >>> batch = collate([{"tokens": [1, 2, 3], "label": 0}, {"tokens": [4], "label": 1}])
        >>> batch["tokens"].tolist(), batch["tokens_lengths"].tolist()
        ([[1, 2, 3], [4, 0, 0]], [3, 1])
    """

    def __init__(self, pad_keys: Sequence[str] = (), padding_value: float = 0) -> None:
        self.pad_keys = list(pad_keys)
        self.padding_value = padding_value

    def __call__(self, samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not samples:
            raise ValueError("PaddingCollate got an empty batch")
        missing = [k for k in self.pad_keys if k not in samples[0]]
        if missing:
            raise KeyError(
                f"PaddingCollate: pad_keys {missing} not in the samples' fields "
                f"{sorted(samples[0])}; set pad_keys to fields the dataset returns"
            )
        batch: dict[str, Any] = {}
        for key in samples[0]:
            values = [sample[key] for sample in samples]
            if key in self.pad_keys:
                tensors = [torch.as_tensor(v) for v in values]
                lengths = torch.tensor([len(t) for t in tensors], dtype=torch.int64)
                batch[key] = torch.nn.utils.rnn.pad_sequence(
                    tensors, batch_first=True, padding_value=self.padding_value
                )
                positions = torch.arange(batch[key].shape[1])
                batch[f"{key}_lengths"] = lengths
                batch[f"{key}_mask"] = positions[None, :] < lengths[:, None]
            else:
                batch[key] = _stack(values)
        return batch


def _stack(values: list[Any]) -> Any:
    first = values[0]
    if isinstance(first, torch.Tensor):
        return torch.stack(values)
    if isinstance(first, np.ndarray):
        return torch.as_tensor(np.stack(values))
    if isinstance(first, (int, float, bool, np.number)):
        return torch.as_tensor(values)
    return values


class EpochSeed:
    """The seed and epoch a :class:`BucketBatchSampler` draws its order from.

    It is the sampler's ``sampler`` attribute because that is where Accelerate and
    the loop look for a seedable sampler: ``set_epoch`` reaches it through a prepared
    (and sharded) dataloader, and the loop saves ``initial_seed`` in each checkpoint.
    """

    def __init__(self, initial_seed: int) -> None:
        self.initial_seed = int(initial_seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of samples of similar length, shuffled per epoch, resumable exactly.

    Samples are sorted by length and cut into ``num_buckets`` buckets of equal counts;
    batches are drawn inside a bucket, and the leftovers of all buckets are batched
    together at the end. A batch holds either ``batch_size`` samples, or as many as fit
    ``max_tokens`` once padded (batch size x longest length in the batch).

    Every epoch's batches are a pure function of ``(seed, epoch)``: with ``shuffle``,
    the samples inside a bucket and the order of the batches change per epoch, the
    same way on every process and in every restart. (With ``max_tokens`` the batches'
    make-up follows the sorted lengths, so only ties are shuffled within a bucket;
    the batch order still is.) The number of batches is the same every epoch and a
    multiple of ``num_replicas``: Accelerate hands every process every
    ``num_replicas``-th batch, so all processes run the same number of updates and
    each sample is seen exactly once per epoch (``drop_last=False``). Where the count
    is not a multiple, the largest batches are split in two (never over a budget).

    Use it as a ``DataLoader``'s ``batch_sampler``; the loop calls ``set_epoch`` and,
    on a mid-epoch resume, skips the batches already trained by index.

    Args:
        lengths: the length (or duration) of every sample, or a dataset with a
            ``lengths`` or ``durations`` attribute.
        batch_size: samples per batch (give this or ``max_tokens``).
        max_tokens: the largest padded size (samples x longest length) of a batch.
        num_buckets: how many length buckets to draw batches from.
        shuffle: shuffle per epoch; ``False`` gives a fixed order.
        drop_last: drop the incomplete leftover batch instead of keeping it.
        seed: the seed of the order; default: the torch seed when the sampler is
            built (the run's ``seed``: the launcher seeds before building data), taken
            from process 0 on the first iteration so all processes agree.
        num_replicas: processes the batches are shared by; default: ``WORLD_SIZE``.

    Example:
        >>> sampler = BucketBatchSampler([5, 3, 8, 2, 7, 4], batch_size=2, seed=0)
        >>> sorted(i for batch in sampler for i in batch)
        [0, 1, 2, 3, 4, 5]
    """

    def __init__(
        self,
        lengths: Sequence[float] | Any,
        *,
        batch_size: int | None = None,
        max_tokens: float | None = None,
        num_buckets: int = 10,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int | None = None,
        num_replicas: int | None = None,
    ) -> None:
        if not isinstance(lengths, (Sequence, np.ndarray, torch.Tensor)):
            name = "lengths" if hasattr(lengths, "lengths") else "durations"
            lengths = getattr(lengths, name, lengths)
        self.lengths = np.asarray(lengths, dtype=np.float64).reshape(-1)
        if (batch_size is None) == (max_tokens is None):
            raise ValueError("BucketBatchSampler: give exactly one of batch_size and max_tokens")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"BucketBatchSampler: batch_size must be >= 1, got {batch_size}")
        if max_tokens is not None and self.lengths.size and self.lengths.max() > max_tokens:
            longest = int(self.lengths.argmax())
            raise ValueError(
                f"BucketBatchSampler: sample {longest} has length {self.lengths[longest]:g} "
                f"> max_tokens={max_tokens:g}; raise max_tokens or filter long samples"
            )
        if num_buckets < 1:
            raise ValueError(f"BucketBatchSampler: num_buckets must be >= 1, got {num_buckets}")
        self.max_batch_size = batch_size
        self.max_tokens = max_tokens
        self.num_buckets = num_buckets
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.num_replicas = int(num_replicas or os.environ.get("WORLD_SIZE") or 1)
        self.sampler = EpochSeed(torch.initial_seed() if seed is None else seed)
        self._seed_agreed = seed is not None
        if len(self.batches(0)) == 0:
            raise ValueError(
                f"BucketBatchSampler: {self.lengths.size} samples make no batch for "
                f"{self.num_replicas} process(es); use more data or drop_last=False"
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose batches the next iteration yields."""
        self.sampler.set_epoch(epoch)

    def batches(self, epoch: int) -> list[list[int]]:
        """Every batch of ``epoch``, in order, before sharding across processes."""
        rng = np.random.default_rng([self.sampler.initial_seed & 0xFFFFFFFF, epoch])
        order = np.argsort(self.lengths, kind="stable")
        buckets = np.array_split(order, self.num_buckets) if order.size else []
        batches: list[list[int]] = []
        leftovers: list[int] = []
        for bucket in buckets:
            if self.shuffle:
                bucket = self._shuffled(bucket, rng)
            full, rest = self._cut(bucket.tolist())
            batches += full
            leftovers += rest
        leftovers.sort(key=lambda i: self.lengths[i])
        full, rest = self._cut(leftovers)
        batches += full
        if rest and not self.drop_last:
            batches.append(rest)
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return self._fit_replicas(batches)

    def _shuffled(self, bucket: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        shuffled = bucket[rng.permutation(bucket.size)]
        if self.max_tokens is None:
            return shuffled
        # Sorted again (ties stay shuffled): the number of batches then never changes.
        return shuffled[np.argsort(self.lengths[shuffled], kind="stable")]

    def _cut(self, indices: list[int]) -> tuple[list[list[int]], list[int]]:
        """Cut full batches off ``indices``; return them and the incomplete rest."""
        batches: list[list[int]] = []
        current: list[int] = []
        longest = 0.0
        for index in indices:
            length = self.lengths[index]
            padded = max(longest, length) * (len(current) + 1)
            if self.max_tokens is not None and current and padded > self.max_tokens:
                batches.append(current)
                current, longest = [], 0.0
            current.append(index)
            longest = max(longest, length)
            if self.max_batch_size is not None and len(current) == self.max_batch_size:
                batches.append(current)
                current, longest = [], 0.0
        return batches, current

    def _fit_replicas(self, batches: list[list[int]]) -> list[list[int]]:
        excess = len(batches) % self.num_replicas
        if not excess:
            return batches
        if self.drop_last:
            return batches[: len(batches) - excess]
        batches = list(batches)
        for _ in range(self.num_replicas - excess):
            largest = max(range(len(batches)), key=lambda i: len(batches[i]))
            if len(batches[largest]) < 2:
                raise ValueError(
                    f"BucketBatchSampler: {self.lengths.size} samples cannot fill a batch "
                    f"on each of {self.num_replicas} processes"
                )
            batch = batches[largest]
            half = len(batch) // 2
            batches[largest : largest + 1] = [batch[:half], batch[half:]]
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        if not self._seed_agreed:
            self._agree_on_seed()
        yield from self.batches(self.sampler.epoch)

    def _agree_on_seed(self) -> None:
        """Take process 0's default seed everywhere: a script that did not seed every
        process alike would otherwise give each one another order, and samples would
        be seen twice or never. Every process iterates the loader, so all meet here."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            seed = [self.sampler.initial_seed]
            dist.broadcast_object_list(seed, src=0)
            self.sampler.initial_seed = int(seed[0])
        self._seed_agreed = True

    def __len__(self) -> int:
        # The count is the same every epoch (see the class docstring).
        return len(self.batches(0))
