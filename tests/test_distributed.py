"""Two real processes on CPU (gloo, started by torchrun): ranks agree, one rank writes.

Each test runs ``tests/dist_harness.py`` under ``torchrun --standalone`` and compares
what each rank recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from accel_hydra.storage import CheckpointStore
from tests.conftest import run_module
from tests.test_resume import assert_bitwise_equal

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCHRUN = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")

pytestmark = pytest.mark.skipif(
    not os.path.exists(TORCHRUN) or not torch.distributed.is_available(),
    reason="needs torchrun and torch.distributed",
)


def torchrun(nproc, scenario, out, project, *args, timeout=240):
    return run_module(
        "tests.dist_harness",
        scenario,
        "--out",
        out,
        "--project",
        project,
        *args,
        timeout=timeout,
        env={"ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"},
        runner=(TORCHRUN, "--standalone", "--nproc_per_node", str(nproc)),
    )


def ranks(out, scenario, n=2):
    return [json.loads((out / f"{scenario}_rank{r}.json").read_text()) for r in range(n)]


def test_lr_schedule_is_the_same_for_one_and_two_processes(tmp_path):
    """Same global batch (32 samples per update): 1 process x accumulation 4 versus
    2 processes x accumulation 2. Every scheduler sees the same LR at every update."""
    one = torchrun(1, "lr", tmp_path / "one", tmp_path / "p1", "--accumulation", 4)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(2, "lr", tmp_path / "two", tmp_path / "p2", "--accumulation", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    (single,) = ranks(tmp_path / "one", "lr", n=1)
    rank0, rank1 = ranks(tmp_path / "two", "lr")
    for name in ("steplr", "onecycle", "warmup_cosine"):
        assert len(single[name]) == 6, name  # 2 epochs x 3 updates
        assert rank0[name] == pytest.approx(single[name], rel=1e-12), name
        assert rank1[name] == rank0[name], name
    assert single["warmup_cosine"][:3] == pytest.approx([0.005, 0.0075, 0.01])


def test_ranks_with_different_metrics_stop_at_the_same_epoch(tmp_path):
    run = torchrun(2, "metrics", tmp_path / "out", tmp_path / "p", "--epochs", 6)
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = ranks(tmp_path / "out", "metrics")
    # Alone, rank 0 would train all 6 epochs and rank 1 stop after 3; the averaged
    # metric (1.0, 1.05, 1.075, ...) stalls after epoch 1, so both stop after epoch 3.
    assert rank0["epoch"] == rank1["epoch"] == 3
    assert rank0["stopped"] and rank1["stopped"]


def test_one_process_writes_the_config_and_commits_checkpoints(tmp_path):
    run = torchrun(2, "writers", tmp_path / "out", tmp_path / "p")
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = ranks(tmp_path / "out", "writers")
    assert rank0["config_written"] == str(tmp_path / "p" / "config.yaml")
    assert rank1["config_written"] is None
    assert rank0["committed"] == [
        "step_2",
        "step_4",
        "step_6",
        "epoch_1",
        "step_8",
        "step_10",
        "step_12",
        "epoch_2",
    ]
    assert rank1["committed"] == []
    store = CheckpointStore(str(tmp_path / "p" / "checkpoints"))
    assert sorted(store.committed()) == ["epoch_2", "step_12"]
    # Both ranks' RNG states are in every checkpoint.
    files = set(store.read_marker("epoch_2")["files"])
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= files


def test_two_process_resume_equals_uninterrupted_run(tmp_path):
    full = torchrun(2, "train", tmp_path / "full", tmp_path / "pf", "--epochs", 3)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = torchrun(2, "train", tmp_path / "run", tmp_path / "pr", "--epochs", 3, "--kill-at", 9)
    assert killed.returncode != 0
    # Saved in the background (async_save), step_8 is committed at the next save, once
    # both processes agree their files are written: the kill at step 9 leaves the
    # checkpoint before it, epoch_1 (committed by the save of step_8).
    assert CheckpointStore(str(tmp_path / "pr" / "checkpoints")).latest() == "epoch_1"
    resumed = torchrun(
        2, "train", tmp_path / "run", tmp_path / "pr", "--epochs", 3, "--resume", "latest"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_bitwise_equal(
        tmp_path / "run" / "train_result.pt", tmp_path / "full" / "train_result.pt"
    )


@pytest.mark.parametrize(
    "fused", [True, pytest.param(False, marks=pytest.mark.full_grid)], ids=["fused", "foreach"]
)
def test_a_nan_on_one_rank_stops_both_at_the_same_update(tmp_path, fused):
    """Rank 1 alone sees a NaN loss from update 7 on; the guard reads nothing per
    update. Both ranks notice at the next loss read (the logging step 8), name update 7,
    and write no checkpoint after it; with a fused optimizer both skipped updates 7
    and 8 on the device, so their parameters are finite and equal."""
    flag = ["--fused"] if fused else []
    run = torchrun(2, "nan", tmp_path / "out", tmp_path / "p", *flag, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = ranks(tmp_path / "out", "nan")
    for seen in (rank0, rank1):
        assert (seen["step"], seen["nonfinite_loss_step"], seen["stopped"]) == (8, 7, True)
    store = CheckpointStore(str(tmp_path / "p" / "checkpoints"))
    assert sorted(store.committed()) == ["epoch_1", "step_2", "step_4", "step_6"]
    if fused:
        assert rank0["params_finite"] and rank1["params_finite"]
        assert rank0["params"] == rank1["params"]


def test_uneven_shards_do_not_hang(tmp_path):
    """100 samples in batches of 8 on 2 processes with even_batches=False: one rank has
    7 batches, the other 6; both run 6 per epoch and finish."""
    run = torchrun(
        2, "train", tmp_path / "out", tmp_path / "p", "--samples", 100, "--uneven", timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rank0, rank1 = ranks(tmp_path / "out", "train")
    assert rank0["step"] == rank1["step"] == 12
