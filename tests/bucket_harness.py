"""Two real processes draw BucketBatchSampler batches through a prepared DataLoader.

Run under ``torchrun --nproc_per_node 2 -m tests.bucket_harness OUT``: each rank writes
``OUT/rank<r>.json`` with the sample indices of every batch it got, per epoch.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from accel_hydra.data import BucketBatchSampler
from accel_hydra.distributed import shut_down_process_group

LENGTHS = [(i * 37) % 23 + 1 for i in range(101)]
MAX_TOKENS = 60


def main(out: str) -> None:
    accelerator = Accelerator(cpu=True)
    # Each process seeded differently, no seed given: the sampler must agree on one.
    torch.manual_seed(100 + int(os.environ.get("RANK", "0")))
    sampler = BucketBatchSampler(LENGTHS, max_tokens=MAX_TOKENS, num_buckets=4)
    loader = accelerator.prepare(DataLoader(torch.arange(len(LENGTHS)), batch_sampler=sampler))
    epochs = []
    for epoch in range(2):
        loader.set_epoch(epoch)
        epochs.append([batch.tolist() for batch in loader])
    path = os.path.join(out, f"rank{accelerator.process_index}.json")
    with open(path, "w") as f:
        json.dump(epochs, f)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(sys.argv[1])
    shut_down_process_group()
