"""What agreeing on a preemption signal costs per update, on 2 gloo processes.

Every update, each process of a multi-process run tells the others whether it was
signalled (``accel_hydra.preemption.InterruptAgreement``): it starts a one-number
all-reduce without waiting and reads the one started an update earlier. This script
times a small DDP training update three ways, in the same run, the variants in turn:

- ``none``: no agreement (what a run that cannot be preempted pays);
- ``async``: ``InterruptAgreement.poll`` after every update (what the loop does);
- ``blocking``: a blocking all-reduce of the flag after every update (the naive way).

Run from the repository root: ``python benchmarks/preemption_agreement.py``.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from accel_hydra.preemption import InterruptAgreement


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank: int, port: int, args: argparse.Namespace, results: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(
        nn.Sequential(nn.Linear(32, args.hidden), nn.ReLU(), nn.Linear(args.hidden, 10))
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))

    def update() -> None:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def none(_agreement: InterruptAgreement) -> None:
        update()

    def asynchronous(agreement: InterruptAgreement) -> None:
        update()
        agreement.poll(False)

    def blocking(_agreement: InterruptAgreement) -> None:
        update()
        flag = torch.tensor([0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        flag.item()

    variants = {"none": none, "async": asynchronous, "blocking": blocking}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for repeat in range(args.repeats):
        order = list(variants)[repeat % 3 :] + list(variants)[: repeat % 3]
        for name in order:
            agreement = InterruptAgreement()
            for _ in range(50):  # warm up
                variants[name](agreement)
            dist.barrier()
            start = time.perf_counter()
            for _ in range(args.updates):
                variants[name](agreement)
            agreement.now(False)
            times[name].append((time.perf_counter() - start) / args.updates * 1e6)
    if rank == 0:
        results.update({name: statistics.median(values) for name, values in times.items()})
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(free_port(), args, results), nprocs=2)
        base = results["none"]
        print(f"torch {torch.__version__}, 2 gloo processes, MLP 32-{args.hidden}-10, batch 64")
        print(f"{'variant':10} {'us/update':>10} {'extra us':>9}")
        for name in ("none", "async", "blocking"):
            value = results[name]
            print(f"{name:10} {value:10.1f} {value - base:9.1f}")


if __name__ == "__main__":
    main()
