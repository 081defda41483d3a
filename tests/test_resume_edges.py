"""Exact resume at the edges of an epoch, not only in its middle.

A grid of real kills (SIGKILL) and preemptions (SIGTERM) of ``tests/resume_harness.py``
at the first, a middle and the last update of an epoch, during validation and between
two epochs, for epochs that are not a plain pass over the dataloader: ``epoch_length``
shorter than the loader, an accumulation that does not divide the epoch, and a loader
without ``len()`` shorter than ``epoch_length``. Every resumed run must end with the
uninterrupted run's number of updates and bitwise-equal parameters and optimizer state.

A representative slice runs everywhere; the whole grid is marked ``full_grid``.
"""

from __future__ import annotations

import signal

import pytest
import torch
import torch.distributed as dist

from tests.test_resume import assert_bitwise_equal, harness, torchrun_harness

# name: (harness arguments, batches per epoch, last batch index of an epoch)
EPOCHS = {
    # 6 of the loader's 12 batches, one update each.
    "epoch_length_6": (["--epoch-length", 6], 6),
    # 7 batches with accumulation 3: updates of 3, 3 and 1 batches.
    "epoch_length_7_accumulation_3": (["--epoch-length", 7, "--accumulation", 3], 7),
    # The whole loader (12 batches) with accumulation 5: updates of 5, 5 and 2 batches.
    "accumulation_5": (["--accumulation", 5], 12),
    # A stream without len() of 12 batches, epoch_length 14: the loader ends the epoch.
    "stream_shorter_than_epoch_length": (
        ["--iterable", "--epoch-length", 14, "--accumulation", 5],
        12,
    ),
}

# Every update is checkpointed, so a SIGKILL resumes from the update just before it,
# and that checkpoint is at an epoch's edge whenever the kill is.
COMMON = ["--epochs", 3, "--save-every", 1]


def positions(batches: int) -> dict[str, str]:
    """Where to send the signal, as ``--signal-at`` values, for epochs of ``batches``."""
    return {
        "first_update": "train:1:0",
        "middle": f"train:1:{batches // 2}",
        "last_update": f"train:1:{batches - 1}",
        "validation": "val:0:1",
        "between_epochs": "epoch_end:0:-1",
    }


GRID = [
    pytest.param(epochs, where, sig, id=f"{epochs}-{where}-{sig}")
    for epochs in EPOCHS
    for where in positions(EPOCHS[epochs][1])
    for sig in ("TERM", "KILL")
]

# The unmarked slice: the reproduction, and a SIGKILL that resumes from the
# checkpoint of an epoch's last, partial update. (tests/test_direct_updates.py covers
# the stream's last partial update in-process.)
SLICE = {
    ("epoch_length_6", "last_update", "TERM"),
    ("epoch_length_7_accumulation_3", "validation", "KILL"),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's final state, one per kind of epoch."""
    cache = {}

    def get(epochs):
        if epochs not in cache:
            root = tmp_path_factory.mktemp(f"reference_{epochs}")
            done = harness(root, root / "result.pt", *COMMON, *EPOCHS[epochs][0])
            assert done.returncode == 0, done.stderr[-3000:]
            cache[epochs] = root / "result.pt"
        return cache[epochs]

    return get


def signal_then_resume(tmp_path, reference, epochs, where, sig):
    args = [*COMMON, *EPOCHS[epochs][0]]
    at = positions(EPOCHS[epochs][1])[where]
    stopped = harness(tmp_path, tmp_path / "unused.pt", *args, "--signal-at", at, "--send", sig)
    expected = -signal.SIGKILL if sig == "KILL" else 128 + signal.SIGTERM
    assert stopped.returncode == expected, stopped.stderr[-3000:]
    resumed = harness(tmp_path, tmp_path / "result.pt", *args, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_bitwise_equal(tmp_path / "result.pt", reference(epochs))


@pytest.mark.parametrize(
    ("epochs", "where", "sig"),
    [p for p in GRID if tuple(p.values) in SLICE],
)
def test_resume_at_an_epoch_edge_is_bitwise_equal(tmp_path, reference, epochs, where, sig):
    signal_then_resume(tmp_path, reference, epochs, where, sig)


@pytest.mark.full_grid
@pytest.mark.parametrize(
    ("epochs", "where", "sig"),
    [p for p in GRID if tuple(p.values) not in SLICE],
)
def test_resume_anywhere_in_the_grid_is_bitwise_equal(tmp_path, reference, epochs, where, sig):
    signal_then_resume(tmp_path, reference, epochs, where, sig)


TWO_PROCESS_CASES = [
    # A kill during validation resumes from the checkpoint of the epoch's last update,
    # whose position equals the (smallest) shard's batch count.
    pytest.param("val:0:1", "KILL", id="validation-KILL"),
    pytest.param("train:1:5", "TERM", id="last_update-TERM"),
]


@pytest.mark.full_grid
@pytest.mark.skipif(not dist.is_available(), reason="needs torch.distributed")
@pytest.mark.parametrize(("at", "sig"), TWO_PROCESS_CASES)
def test_two_processes_with_uneven_shards_resume_bitwise_equal(tmp_path, at, sig):
    """104 samples in batches of 8 on 2 processes with even_batches=False: shards of 7
    and 6 batches, so both processes run epochs of 6 batches (one update each)."""
    args = [*COMMON, "--samples", 104, "--uneven", "--accumulation", 1]

    def torchrun(project, result, *more):
        return torchrun_harness(project, result, *args, *more)

    full = torchrun(tmp_path / "full", tmp_path / "full.pt")
    assert full.returncode == 0, full.stderr[-3000:]
    stopped = torchrun(tmp_path / "run", tmp_path / "unused.pt", "--signal-at", at, "--send", sig)
    assert stopped.returncode != 0
    resumed = torchrun(tmp_path / "run", tmp_path / "result.pt", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_bitwise_equal(tmp_path / "result.pt", tmp_path / "full.pt")
    assert torch.load(tmp_path / "full.pt", weights_only=False)["step"] == 18
