"""BlockRandomSampler gives Accelerate's seedable order, index for index.

The grid compares it with the installed ``SeedableRandomSampler`` (and so with the
installed torch's ``RandomSampler``): it runs in every tox env, which is the guard
against a torch release that draws differently. The trainer tests check that a run
with it trains bitwise like one without, and that a checkpoint taken with the old
sampler resumes bitwise with the new one.
"""

from __future__ import annotations

import itertools
import signal
from dataclasses import dataclass, field

import pytest
import torch
from accelerate.data_loader import (
    BatchSamplerShard,
    SeedableRandomSampler,
    prepare_data_loader,
    skip_first_batches,
)
from torch.utils.data import DataLoader, RandomSampler

from accel_hydra import epoch_order
from accel_hydra.epoch_order import BlockRandomSampler, use_block_order
from tests.conftest import ToyTrainer, parameters_of, trainer_kwargs
from tests.test_resume import assert_bitwise_equal, harness


def both(n, num_samples, replacement, seed):
    return [
        cls(range(n), replacement=replacement, num_samples=num_samples, data_seed=seed)
        for cls in (SeedableRandomSampler, BlockRandomSampler)
    ]


def sample_counts(n, replacement):
    """None, fewer than n, a multiple of n, more and not a multiple; with replacement
    also past one block of draws (32 x 1024 samples)."""
    counts = (None, max(1, n // 2), 3 * n, 2 * n + 5)
    return (*counts, 32 * 1024 + 45) if replacement else counts


@pytest.mark.parametrize("replacement", [False, True], ids=["permutation", "replacement"])
def test_every_epoch_order_equals_accelerates(replacement):
    for n in (1, 7, 64, 100):
        counts = sample_counts(n, replacement)
        for num_samples, seed in itertools.product(counts, (0, 1234, 2**40 + 7)):
            original, block = both(n, num_samples, replacement, seed)
            for epoch in (0, 1, 5):
                original.set_epoch(epoch)
                block.set_epoch(epoch)
                case = f"n={n} num_samples={num_samples} seed={seed} epoch={epoch}"
                assert list(block) == list(original), case
                assert block.epoch == original.epoch == epoch + 1, case


def test_the_epoch_advances_only_when_the_order_is_used_up():
    original, block = both(10, None, False, 3)
    partial = [list(itertools.islice(iter(s), 4)) for s in (original, block)]
    assert partial[0] == partial[1]
    assert original.epoch == block.epoch == 0  # abandoned early: no advance
    # Iterated without set_epoch in between: the next epoch's order, as before.
    assert list(block) == list(original)
    assert list(block) == list(original)
    assert original.epoch == block.epoch == 2
    # The epoch set while iterating is the one advanced from, as in the original.
    iterators = [iter(s) for s in (original, block)]
    firsts = [next(i) for i in iterators]
    original.set_epoch(7)
    block.set_epoch(7)
    rests = [list(i) for i in iterators]
    assert (firsts[0], rests[0]) == (firsts[1], rests[1])
    assert original.epoch == block.epoch == 8


def prepared(processes=1, index=0, generator=None, sampler_class=None):
    data = list(range(50))
    if sampler_class is not None:
        loader = DataLoader(data, batch_size=4, sampler=sampler_class(data))
    else:
        loader = DataLoader(data, batch_size=4, shuffle=True, generator=generator)
    return prepare_data_loader(
        loader, num_processes=processes, process_index=index, use_seedable_sampler=True
    )


def batches(loader, epoch):
    loader.set_epoch(epoch)
    return [batch.tolist() for batch in loader]


@pytest.mark.parametrize("processes", [1, 2])
def test_a_prepared_loader_yields_the_same_batches_also_sharded_and_skipped(processes):
    index = processes - 1
    original, swapped = prepared(processes, index), prepared(processes, index)
    assert use_block_order(swapped)
    sampler = swapped.get_sampler()
    assert type(sampler) is BlockRandomSampler
    if processes > 1:  # Accelerate reaches it through the shard as well
        assert isinstance(swapped.batch_sampler, BatchSamplerShard)
        assert swapped.batch_sampler.batch_sampler.sampler is sampler
    assert sampler.initial_seed == original.get_sampler().initial_seed
    for epoch in (0, 1, 4):
        assert batches(swapped, epoch) == batches(original, epoch)
    # A mid-epoch resume iterates through Accelerate's skipping loader.
    skipped = [skip_first_batches(loader, 3) for loader in (original, swapped)]
    assert batches(skipped[1], 2) == batches(skipped[0], 2)


def test_it_keeps_the_original_where_the_order_could_change(monkeypatch):
    # A generator of the user's may be shared with other draws between the samples.
    shared = prepared(generator=torch.Generator().manual_seed(5))
    assert not use_block_order(shared)
    assert type(shared.get_sampler()) is SeedableRandomSampler
    # A sampler already iterated holds its generator: leave it alone.
    used = prepared()
    batches(used, 0)
    assert not use_block_order(used)
    # Not a RandomSampler: Accelerate keeps the user's sampler, so do we.
    assert not use_block_order(prepared(sampler_class=torch.utils.data.SequentialSampler))
    # A torch whose RandomSampler draws another way (here: reversed) fails the probe.
    draw = RandomSampler.__iter__
    monkeypatch.setattr(RandomSampler, "__iter__", lambda self: reversed(list(draw(self))))
    epoch_order._orders_match.cache_clear()
    try:
        assert not use_block_order(prepared())
    finally:
        monkeypatch.undo()
        epoch_order._orders_match.cache_clear()
    assert use_block_order(prepared())


@dataclass(kw_only=True, eq=False)
class RecordingTrainer(ToyTrainer):
    seen: list = field(default_factory=list)

    def training_step(self, batch, batch_idx):
        self.seen.append(batch[1].clone())
        return super().training_step(batch, batch_idx)


@dataclass(kw_only=True, eq=False)
class SeedableTrainer(RecordingTrainer):
    _block_epoch_order = False


def test_a_shuffled_run_trains_bitwise_like_one_with_accelerates_sampler(tmp_path):
    runs = {}
    for cls in (RecordingTrainer, SeedableTrainer):
        torch.manual_seed(0)  # the same initial weights
        trainer = cls(**trainer_kwargs(tmp_path / cls.__name__, epochs=3), report_to=None)
        trainer.train(seed=0)
        runs[cls] = trainer
    block, original = runs[RecordingTrainer], runs[SeedableTrainer]
    assert type(block._shuffling_sampler()) is BlockRandomSampler
    assert type(original._shuffling_sampler()) is SeedableRandomSampler
    assert len(block.seen) == len(original.seen) == 36
    for mine, theirs in zip(block.seen, original.seen, strict=True):
        assert torch.equal(mine, theirs)
    assert block.seen[0].tolist() != block.seen[12].tolist()  # it does shuffle per epoch
    original_parameters = parameters_of(original.model)
    for name, tensor in parameters_of(block.model).items():
        assert torch.equal(tensor, original_parameters[name]), name


OLD = ("--seedable-sampler",)


@pytest.mark.parametrize(
    ("killed_with", "resumed_with", "accumulation"),
    [
        pytest.param(OLD, (), 1, id="old-to-new"),
        pytest.param((), OLD, 3, id="new-to-old-accumulating", marks=pytest.mark.full_grid),
    ],
)
def test_a_mid_epoch_checkpoint_resumes_bitwise_across_the_samplers(
    tmp_path, killed_with, resumed_with, accumulation
):
    """A checkpoint written with Accelerate's sampler (every checkpoint before this
    change) resumes with the new one as if never stopped; the full grid also runs the
    way back, with gradient accumulation."""
    reference, run = tmp_path / "reference", tmp_path / "run"
    reference.mkdir()
    run.mkdir()
    common = ("--accumulation", accumulation)
    done = harness(reference, reference / "result.pt", *common, *OLD)
    assert done.returncode == 0, done.stderr[-3000:]
    at = 17 if accumulation == 1 else 7  # mid-epoch, past a step checkpoint
    killed = harness(
        run, run / "unused.pt", *common, *killed_with, "--kill", "mid_epoch", "--at", at
    )
    assert killed.returncode == -signal.SIGKILL
    resumed = harness(run, run / "result.pt", *common, *resumed_with, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_bitwise_equal(run / "result.pt", reference / "result.pt")
