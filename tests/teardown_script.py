"""Process groups torn down right after the exchange the loop's preemption flag uses.

Run under ``torchrun --nproc_per_node 2`` with a scratch directory and a count: each
round sets up a gloo group, runs one asynchronous all-reduce whose tensor Python drops
at once (as ``InterruptAgreement`` does at every update), then leaves the group with
``shut_down_process_group``. With a barrier in the teardown, torch 2.6 deadlocked in
about one round in seventy.
"""

import os
import sys

import torch
import torch.distributed as dist

from accel_hydra.distributed import shut_down_process_group

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
scratch, rounds = sys.argv[1], int(sys.argv[2])
for done in range(rounds):
    store = dist.FileStore(os.path.join(scratch, f"store_{done}"), world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    flag = torch.zeros(1)
    work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
    work.wait()
    del work, flag
    shut_down_process_group(timeout=20)
print(f"rank {rank} left {rounds} groups", flush=True)
