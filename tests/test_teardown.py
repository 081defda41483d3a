"""Leaving the process group never holds a finished job forever."""

import os
import subprocess
import sys
import time

from tests.conftest import REPO
from tests.storage_servers import free_port

# Rank 0 finished its run and leaves; rank 1 never reaches the barrier (as when the
# teardown itself hangs): rank 0 must give up after its timeout and exit 0.
SCRIPT = """
import os, sys, time
import torch.distributed as dist
from accel_hydra.distributed import shut_down_process_group

rank = int(os.environ["RANK"])
dist.init_process_group("gloo", rank=rank, world_size=2)
print(f"rank {rank} joined", flush=True)
if rank == 1:
    time.sleep(120)
    sys.exit(3)
shut_down_process_group(timeout=2)
print("rank 0 returned", flush=True)
"""


def test_a_hung_teardown_exits_cleanly_after_its_timeout():
    port = free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}

    def start(rank):
        return subprocess.Popen(
            [sys.executable, "-c", SCRIPT],
            cwd=REPO,
            env={**env, "RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    stuck = start(1)
    leaving = start(0)
    try:
        started = time.monotonic()
        out, err = leaving.communicate(timeout=60)
        waited = time.monotonic() - started
    finally:
        stuck.kill()
        stuck.wait()
    assert leaving.returncode == 0, err
    assert "rank 0 joined" in out
    assert "rank 0 returned" not in out  # it left at once instead of carrying on
    assert "leaving the process group did not finish in 2 s" in err
    assert waited < 50  # a hang would have run into the 60 s limit above
