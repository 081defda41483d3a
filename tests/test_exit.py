"""A user's own 2-process ``torchrun`` script that calls ``train()`` exits 0, every time.

Without the trainer's teardown at exit, about one run in ten aborted after its work
was done ("terminate called without an active exception", status -6 on one rank).
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from tests.conftest import REPO, run_command

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="needs torch.distributed"
)


def run_user_script(project):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", os.path.join(REPO, "tests", "user_script.py"),
               str(project)]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": REPO}  # fmt: skip
    return run_command(command, env=env, timeout=180)


def run_many(tmp_path, times):
    for attempt in range(times):
        done = run_user_script(tmp_path / str(attempt))
        assert done.returncode == 0, f"run {attempt + 1}/{times}: " + done.stderr[-3000:]
        assert done.stdout.count("user script done") == 2


def test_a_user_torchrun_script_exits_0(tmp_path):
    run_many(tmp_path, 3)


@pytest.mark.full_grid
def test_a_user_torchrun_script_exits_0_twenty_times_in_a_row(tmp_path):
    run_many(tmp_path, 20)
