"""Kill a real training process anywhere; the resumed run ends bitwise equal.

Each case runs ``tests/resume_harness.py`` in a subprocess that sends itself SIGKILL
(or SIGTERM) at a chosen moment, then runs the same command with
``resume_from_checkpoint=latest`` and compares every parameter and optimizer-state
tensor with an uninterrupted run using ``torch.equal``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from accel_hydra.storage import CheckpointStore
from tests.conftest import run_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def harness(project, result, *args, processes=1):
    """Run tests.resume_harness; ``processes=2``: on 2 gloo processes of one machine
    (``torchrun --standalone``)."""
    env = {"ACCELERATE_USE_CPU": "true"}
    runner = (sys.executable,)
    if processes > 1:
        from tests.test_distributed import TORCHRUN

        env["OMP_NUM_THREADS"] = "1"
        runner = (TORCHRUN, "--standalone", "--nproc_per_node", str(processes))
    return run_module(
        "tests.resume_harness",
        "--project",
        project,
        "--result",
        result,
        *args,
        env=env,
        runner=runner,
    )


def torchrun_harness(project, result, *args):
    return harness(project, result, *args, processes=2)


def assert_bitwise_equal(result_a, result_b):
    a = torch.load(result_a, weights_only=False)
    b = torch.load(result_b, weights_only=False)
    assert (a["step"], a["epoch"]) == (b["step"], b["epoch"])
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), f"parameter {key} differs"
    state_a, state_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert state_a.keys() == state_b.keys()
    for index in state_a:
        for key, value in state_a[index].items():
            assert torch.equal(value, state_b[index][key]), f"optimizer {index}.{key} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run's final state, one per accumulation setting."""
    cache = {}

    def get(accumulation):
        if accumulation not in cache:
            root = tmp_path_factory.mktemp(f"reference_{accumulation}")
            done = harness(root, root / "result.pt", "--accumulation", accumulation)
            assert done.returncode == 0, done.stderr[-3000:]
            cache[accumulation] = root / "result.pt"
        return cache[accumulation]

    return get


def kill_then_resume(tmp_path, accumulation, *kill_args):
    killed = harness(tmp_path, tmp_path / "unused.pt", "--accumulation", accumulation, *kill_args)
    resumed = harness(
        tmp_path, tmp_path / "result.pt", "--accumulation", accumulation, "--resume", "latest"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return killed, resumed


# Updates per epoch: 12 with accumulation 1, 4 with accumulation 3; a step checkpoint
# every 3 updates, so every resume below but in_validation starts mid-epoch.
KILL_POINTS = {
    ("mid_epoch", 1): 17,
    ("mid_epoch", 3): 7,
    ("after_checkpoint", 1): 15,
    ("after_checkpoint", 3): 6,
    ("in_validation", 1): -1,
    ("in_validation", 3): -1,
}


@pytest.mark.parametrize("accumulation", [1, 3])
@pytest.mark.parametrize("kill", ["mid_epoch", "after_checkpoint", "in_validation"])
def test_sigkill_anywhere_then_resume_is_bitwise_equal(tmp_path, reference, kill, accumulation):
    at = KILL_POINTS[(kill, accumulation)]
    killed, resumed = kill_then_resume(tmp_path, accumulation, "--kill", kill, "--at", at)
    assert killed.returncode == -signal.SIGKILL
    assert "resumed from" in resumed.stdout
    assert_bitwise_equal(tmp_path / "result.pt", reference(accumulation))


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path, reference):
    killed = harness(
        tmp_path, tmp_path / "unused.pt", "--kill", "during_save", "--at", 18, "--sync-save"
    )
    assert killed.returncode == -signal.SIGKILL
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / ".staging-step_18" / "model.safetensors").exists()  # half-written
    assert CheckpointStore(str(checkpoints)).latest() == "step_15"

    resumed = harness(tmp_path, tmp_path / "result.pt", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_15" in resumed.stdout
    assert_bitwise_equal(tmp_path / "result.pt", reference(1))


def test_sigterm_checkpoints_and_exits_nonzero(tmp_path, reference):
    interrupted = harness(tmp_path, tmp_path / "unused.pt", "--kill", "sigterm", "--at", 18)
    assert interrupted.returncode == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM at update 19" in interrupted.stderr
    assert 'resume_from_checkpoint="latest"' in interrupted.stderr
    assert CheckpointStore(str(tmp_path / "checkpoints")).latest() == "step_19"

    resumed = harness(tmp_path, tmp_path / "result.pt", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_bitwise_equal(tmp_path / "result.pt", reference(1))


def test_truncated_checkpoint_explicit_errors_latest_falls_back(tmp_path, reference):
    killed = harness(tmp_path, tmp_path / "unused.pt", "--kill", "after_checkpoint", "--at", 21)
    assert killed.returncode == -signal.SIGKILL
    weights = tmp_path / "checkpoints" / "step_21" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])

    explicit = harness(tmp_path, tmp_path / "unused.pt", "--resume", "step_21")
    assert explicit.returncode != 0
    assert "step_21 is damaged: model.safetensors has 100 bytes" in explicit.stderr

    resumed = harness(tmp_path, tmp_path / "result.pt", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "skipping step_21" in resumed.stdout
    assert "resumed from" in resumed.stdout and "step_18" in resumed.stdout
    assert_bitwise_equal(tmp_path / "result.pt", reference(1))


def test_two_kills_two_resumes(tmp_path, reference):
    first = harness(
        tmp_path, tmp_path / "unused.pt", "--accumulation", 3, "--kill", "mid_epoch", "--at", 5
    )
    assert first.returncode == -signal.SIGKILL
    second = harness(
        tmp_path,
        tmp_path / "unused.pt",
        "--accumulation",
        3,
        "--resume",
        "latest",
        "--kill",
        "mid_epoch",
        "--at",
        7,
    )
    assert second.returncode == -signal.SIGKILL
    assert "resumed from" in second.stdout and "epoch_1 (epoch 1, step 4" in second.stdout
    resumed = harness(tmp_path, tmp_path / "result.pt", "--accumulation", 3, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        "resumed from" in resumed.stdout and "step_6 (epoch 1, step 6, batch 6)" in resumed.stdout
    )
    assert_bitwise_equal(tmp_path / "result.pt", reference(3))


def test_second_run_on_a_directory_fails_naming_the_first_then_resume_after_sigkill(
    tmp_path, reference
):
    checkpoints = str(tmp_path / "shared_checkpoints")
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first = subprocess.Popen(
        [sys.executable, "-m", "tests.resume_harness", "--project", str(first_dir), "--result",
         str(first_dir / "unused.pt"), "--checkpoint-dir", checkpoints, "--pause-at", "5"],
        cwd=REPO,
        env={**os.environ, "ACCELERATE_USE_CPU": "true"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not (first_dir / "paused").exists():
            assert first.poll() is None and time.monotonic() < deadline, "first run never paused"
            time.sleep(0.1)

        second = harness(second_dir, second_dir / "unused.pt", "--checkpoint-dir", checkpoints)

        assert second.returncode != 0
        last = second.stderr.strip().splitlines()[-1]
        assert f"checkpoint_dir {checkpoints} is in use by pid {first.pid} on host " in last
        assert not (second_dir / "logs").exists() or not any((second_dir / "logs").iterdir())
    finally:
        first.kill()
        first.wait()

    resumed = harness(
        second_dir, second_dir / "result.pt", "--checkpoint-dir", checkpoints, "--resume", "latest"
    )

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"took over the lock of {checkpoints} left by pid {first.pid}" in resumed.stderr
    assert f"resumed from {checkpoints}/step_3 " in resumed.stdout
    assert_bitwise_equal(second_dir / "result.pt", reference(1))
