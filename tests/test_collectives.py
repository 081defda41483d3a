"""Two real processes (gloo): preemption, failures and machine layout, whatever the
composition.

Each test starts both processes itself (``RANK``/``WORLD_SIZE`` set, no launcher), so
each one's exit status is seen: as one machine, or posing as two (each its own temp
dir, ``LOCAL_RANK=0`` on both) with no ``LOCAL_WORLD_SIZE`` in the environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from accel_hydra.storage import CheckpointStore
from tests.conftest import REPO
from tests.storage_servers import free_port
from tests.test_resume import assert_bitwise_equal

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="needs torch.distributed"
)


def two_processes(tmp_path, *args, machines=1, timeout=240):
    """Run ``tests.collective_harness`` on ranks 0 and 1; returns (codes, outputs)."""
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_WORLD_SIZE", "LOCAL_RANK")}
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=port, WORLD_SIZE="2")  # fmt: skip
    processes = []
    for rank in (0, 1):
        layout = {"RANK": str(rank), "LOCAL_RANK": str(rank)}
        if machines == 2:
            disk = tmp_path / f"machine{rank}_{port}"
            disk.mkdir()
            layout.update(LOCAL_RANK="0", TMPDIR=str(disk))
        command = [sys.executable, "-m", "tests.collective_harness", *map(str, args)]
        processes.append(subprocess.Popen(
            command, cwd=REPO, env={**env, **layout}, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        ))  # fmt: skip
    try:
        outputs = [process.communicate(timeout=timeout) for process in processes]
    finally:
        for process in processes:
            process.kill()
    return [process.returncode for process in processes], outputs


def ranks(out, scenario):
    return [json.loads((out / f"{scenario}_rank{r}.json").read_text()) for r in (0, 1)]


# ------------------------------------------------------------------- preemption


def sigterm_rank_1_in_update_3(tmp_path):
    """CheckpointMixin + LoopBase only (no logging steps): SIGTERM reaches rank 1 during
    update 3; both ranks agree at the end of update 4, save step_4 and exit 143."""
    run = ("preempt", "--out", tmp_path / "run", "--project", tmp_path / "run")
    codes, outputs = two_processes(tmp_path, *run, "--sigterm-rank", 1, "--at", 2)
    assert codes == [143, 143], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert [seen["step"] for seen in ranks(tmp_path / "run", "preempt")] == [4, 4]
    store = CheckpointStore(str(tmp_path / "run" / "checkpoints"))
    assert sorted(store.committed()) == ["step_4"]
    files = store.read_marker("step_4")["files"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(files)
    assert "interrupted by SIGTERM at update 4" in outputs[0][1]
    return run


def test_sigterm_to_one_rank_of_a_lean_trainer_stops_both_within_one_update(tmp_path):
    sigterm_rank_1_in_update_3(tmp_path)


@pytest.mark.full_grid
def test_the_run_preempted_on_one_rank_resumes_bitwise(tmp_path):
    run = sigterm_rank_1_in_update_3(tmp_path)
    full = ("preempt", "--out", tmp_path / "full", "--project", tmp_path / "full")
    codes, outputs = two_processes(tmp_path, *full)
    assert codes == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]

    codes, outputs = two_processes(tmp_path, *run, "--resume", "latest")
    assert codes == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert "resumed from" in outputs[0][0]
    assert_bitwise_equal(tmp_path / "full" / "preempt_result.pt",
                         tmp_path / "run" / "preempt_result.pt")  # fmt: skip


# ------------------------------------------------------------- failure safety

ONE_MACHINE = ["trainer_state:0", "commit:0", "prune:0", "prune_async:0", "metrics:0",
               "metrics:1"]  # fmt: skip
TWO_MACHINES = ["upload:0", "upload:1", "marker:0", "prune:0"]
WHAT = {
    "trainer_state": "writing checkpoint",
    "commit": "committing checkpoint",
    "prune": "pruning old checkpoint",
    "prune_async": "pruning old checkpoint",
    "metrics": "get_val_metrics()",
    "upload": "uploading checkpoint",
    "marker": "committing checkpoint",
}


def assert_every_rank_got_the_same_clear_error(out, cases):
    rank0, rank1 = ranks(out, "failures")
    for case in cases:
        name, failing = case.split(":")
        assert rank0[case] is not None and rank1[case] is not None, case
        assert rank0[case] == rank1[case], case  # same type, message and step
        kind, message, _ = rank0[case]
        assert kind == "DistributedStepError", case
        assert WHAT[name] in message, (case, message)
        assert f"failed on process {failing}" in message, (case, message)
        assert "injected failure" in message and f"on rank {failing}" in message, case


def run_failures(tmp_path, s3, cases, machines):
    """Run ``cases`` in one pair of processes (no launcher: no ``LOCAL_WORLD_SIZE``)."""
    out = tmp_path / "out"
    args = ["failures", "--out", out, "--project", tmp_path / "p"]
    args += ["--bucket", s3.new_bucket(), "--storage-options", json.dumps(s3.storage_options)]
    for case in cases:
        args += ["--case", case]
    codes, outputs = two_processes(tmp_path, *args, machines=machines)
    assert codes == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    assert_every_rank_got_the_same_clear_error(out, cases)
    # Machines are counted from Accelerate's state, not from a launcher's variables
    # (which Accelerate itself fills with a 1 on CPU when they are missing).
    assert [seen["several_machines"] for seen in ranks(out, "failures")] == [machines == 2] * 2


def test_a_failure_on_one_rank_between_collectives_reaches_both(tmp_path, s3):
    """Pruning after a background upload, the commit and the metric agreement, each
    failing on one rank: both ranks raise the same error naming the step and the rank,
    and go on to the next case (no one is left waiting)."""
    run_failures(tmp_path, s3, ["prune_async:0", "commit:0", "metrics:1"], machines=1)


@pytest.mark.full_grid
def test_every_one_machine_failure_on_either_rank_reaches_both(tmp_path, s3):
    """Also the trainer state, local pruning and the metrics failing on rank 0."""
    run_failures(tmp_path, s3, ONE_MACHINE, machines=1)


@pytest.mark.full_grid
def test_on_two_machines_an_upload_or_commit_failure_reaches_both(tmp_path, s3):
    run_failures(tmp_path, s3, TWO_MACHINES, machines=2)
