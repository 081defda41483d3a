"""accel_hydra.data: the padding collate and the bucketed, exactly resumable sampler.

The first tests are upstream AccelHydra's ``tests/test_bucket_sampler.py`` cases,
rewritten for this API (a lengths sequence and batches instead of a dataset attribute
and a flat index stream).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest
import torch

from accel_hydra.data import BucketBatchSampler, PaddingCollate
from tests.bucket_harness import LENGTHS, MAX_TOKENS
from tests.conftest import run_module
from tests.test_resume import assert_bitwise_equal, harness

TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")


class Durations:
    """A dataset that only knows its samples' durations, as upstream's tests use."""

    def __init__(self, durations):
        self.durations = durations

    def __len__(self):
        return len(self.durations)


# ------------------------------------------------------- upstream's cases, this API


def test_samples_are_split_into_equal_count_buckets():
    sampler = BucketBatchSampler(
        Durations(np.arange(22)), batch_size=3, num_buckets=3, shuffle=False
    )
    batches = list(sampler)
    # Buckets of 8, 7 and 7 samples (ordered by length) give 2 full batches each.
    assert batches[:6] == [
        [0, 1, 2],
        [3, 4, 5],
        [8, 9, 10],
        [11, 12, 13],
        [15, 16, 17],
        [18, 19, 20],
    ]
    assert sorted(i for batch in batches for i in batch) == list(range(22))


def test_drop_last_drops_only_the_incomplete_leftover_batch():
    kept = BucketBatchSampler(np.arange(22), batch_size=3, num_buckets=3, shuffle=False)
    dropped = BucketBatchSampler(
        np.arange(22), batch_size=3, num_buckets=3, shuffle=False, drop_last=True
    )
    assert len(dropped) <= len(kept)
    assert sum(len(b) for b in dropped) == 21
    assert sum(len(b) for b in kept) == 22
    assert all(len(b) == 3 for b in dropped)


# ------------------------------------------------------------------ this package


def test_budgets_are_respected():
    lengths = np.random.default_rng(0).integers(1, 50, 300)
    for epoch in range(3):
        sampler = BucketBatchSampler(lengths, max_tokens=200, seed=1)
        sampler.set_epoch(epoch)
        for batch in sampler:
            assert len(batch) * max(lengths[i] for i in batch) <= 200
    fixed = BucketBatchSampler(lengths, batch_size=16, seed=1)
    assert max(len(b) for b in fixed) == 16


def test_order_changes_per_epoch_and_is_fixed_by_the_seed():
    lengths = list(range(1, 61))

    def epoch_batches(seed, epoch):
        sampler = BucketBatchSampler(lengths, batch_size=4, num_buckets=3, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert epoch_batches(5, 0) == epoch_batches(5, 0)
    assert epoch_batches(5, 0) != epoch_batches(5, 1)
    assert epoch_batches(5, 0) != epoch_batches(6, 0)
    assert len(epoch_batches(5, 0)) == len(epoch_batches(5, 1))


def test_default_seed_is_the_runs_seed():
    torch.manual_seed(11)
    assert list(BucketBatchSampler(list(range(40)), batch_size=4)) == list(
        BucketBatchSampler(list(range(40)), batch_size=4, seed=11)
    )


def test_the_batch_count_is_a_multiple_of_the_processes_and_keeps_every_sample():
    sampler = BucketBatchSampler(list(range(1, 24)), batch_size=4, num_replicas=4, seed=0)
    batches = list(sampler)
    assert len(batches) % 4 == 0
    assert sorted(i for b in batches for i in b) == list(range(23))


def test_a_sample_over_the_token_budget_is_one_clear_error():
    with pytest.raises(ValueError, match=r"sample 2 has length 90 > max_tokens=50"):
        BucketBatchSampler([3, 4, 90], max_tokens=50)


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="needs torchrun")
def test_two_processes_see_every_index_exactly_once_per_epoch(tmp_path):
    done = run_module(
        "tests.bucket_harness",
        tmp_path,
        env={"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"},
        runner=(TORCHRUN, "--standalone", "--nproc_per_node", "2"),
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for epoch in range(2):
        seen = [i for rank in ranks for batch in rank[epoch] for i in batch]
        assert sorted(seen) == list(range(len(LENGTHS)))
        assert len(ranks[0][epoch]) == len(ranks[1][epoch])  # same number of updates
        for rank in ranks:
            for batch in rank[epoch]:
                assert len(batch) * max(LENGTHS[i] for i in batch) <= MAX_TOKENS
    assert ranks[0][0] != ranks[0][1]


def test_sigkill_mid_epoch_then_resume_is_bitwise_equal(tmp_path):
    run = ("--bucket", "--epochs", 2)
    reference = harness(tmp_path / "ref", tmp_path / "ref.pt", *run)
    assert reference.returncode == 0, reference.stderr[-3000:]
    # 15 batches per epoch, a checkpoint every 3 updates: killed at update 20 (epoch 2,
    # batch 5), the run resumes from step_18, in the middle of epoch 2.
    killed = harness(tmp_path / "run", tmp_path / "x.pt", *run, "--kill", "mid_epoch", "--at", 20)
    assert killed.returncode == -9
    resumed = harness(tmp_path / "run", tmp_path / "run.pt", *run, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "batch 3" in resumed.stdout
    assert_bitwise_equal(tmp_path / "ref.pt", tmp_path / "run.pt")


def test_padding_collate_pads_and_reports_lengths_and_masks():
    collate = PaddingCollate(pad_keys=["tokens"], padding_value=-1)
    batch = collate(
        [
            {"tokens": torch.tensor([1, 2, 3]), "label": 0, "name": "a"},
            {"tokens": torch.tensor([4]), "label": 1, "name": "b"},
        ]
    )
    assert batch["tokens"].tolist() == [[1, 2, 3], [4, -1, -1]]
    assert batch["tokens_lengths"].tolist() == [3, 1]
    assert batch["tokens_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert batch["label"].tolist() == [0, 1]
    assert batch["name"] == ["a", "b"]


def test_padding_collate_names_a_missing_field():
    with pytest.raises(KeyError, match=r"pad_keys \['audio'\] not in the samples' fields"):
        PaddingCollate(pad_keys=["audio"])([{"tokens": [1]}])
