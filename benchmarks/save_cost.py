"""What one checkpoint of a small state costs the training running beside it.

Wall-clock times of whole runs drift too much on a shared machine to resolve a few
milliseconds per epoch. This measures one save at a time instead, as paired trials:
30 updates of the ``tiny`` MLP (``overhead.py``) alone, and the same 30 updates with
one save started just before them, in rotating order; the cost of a save is the
difference, and the table shows its median over the trials. Three saves:

* ``background``  what the trainer does with ``async_save``: the state copied into
                  host memory, then its files (Accelerate's layout: weights,
                  optimizer, RNG states, the trainer's JSON), checksums, marker,
                  rename and pruning on a writer thread. The trial ends when both the
                  updates and the writer are done.
* ``in_place``    the same files and commit, written on the training thread.
* ``by_hand``     what a careful hand-written loop does: model, optimizer and RNG
                  states in one ``torch.save``, ``fsync``, renamed into place.

Run from the repository root::

    python benchmarks/save_cost.py --trials 200
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from accelerate import Accelerator
from torch.nn.functional import cross_entropy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from accel_hydra.host_snapshot import HostBuffers, take_snapshot, write_snapshot  # noqa: E402
from accel_hydra.retention import checkpoints_to_prune  # noqa: E402
from accel_hydra.safe_state import check_stage_complete  # noqa: E402
from accel_hydra.storage import CheckpointStore  # noqa: E402

MODES = ("none", "background", "in_place", "by_hand")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--updates", type=int, default=30, help="updates per trial")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    x, y = torch.randn(64, 32), torch.randint(0, 10, (64,))

    def train(updates: int) -> None:
        for _ in range(updates):
            cross_entropy(model(x), y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    train(200)  # warm up, and give the optimizer its state
    buffers = HostBuffers()
    root = tempfile.mkdtemp(prefix="accel_hydra_save_cost_")
    store = CheckpointStore(root)
    saves = [0]

    def trainer_save(in_background: bool) -> threading.Thread | None:
        saves[0] += 1
        name = "best" if saves[0] % 2 else f"step_{saves[0]}"
        info = {"step": saves[0], "epoch": 1, "batches_in_epoch": 0}
        state = {"progress": {"step": saves[0]}, "tensor_files": []}
        snapshot = take_snapshot(accelerator, buffers, [], state)

        def write_and_commit() -> None:
            staged = store.staging_dir(name)
            write_snapshot(snapshot, staged)
            check_stage_complete(staged)
            store.commit(name, staged, info)
            for old in checkpoints_to_prune(store.committed(), 1, (), name):
                store.delete(old)

        if not in_background:
            write_and_commit()
            return None
        writer = threading.Thread(target=write_and_commit)
        writer.start()
        return writer

    def save_by_hand() -> None:
        path = os.path.join(root, "by_hand.pt")
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()),
        }
        with open(path + ".tmp", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)

    def trial(mode: str) -> float:
        start = time.perf_counter()
        writer = None
        if mode == "background":
            writer = trainer_save(in_background=True)
        elif mode == "in_place":
            trainer_save(in_background=False)
        elif mode == "by_hand":
            save_by_hand()
        train(args.updates)
        if writer is not None:
            writer.join()
        return time.perf_counter() - start

    costs: dict[str, list[float]] = {mode: [] for mode in MODES[1:]}
    alone: list[float] = []
    try:
        for i in range(args.trials):
            order = MODES[i % len(MODES) :] + MODES[: i % len(MODES)]
            took = {mode: trial(mode) for mode in order}
            alone.append(took["none"] * 1e3)
            for mode in costs:
                costs[mode].append((took[mode] - took["none"]) * 1e3)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"{args.updates} updates alone: {statistics.median(alone):.2f} ms (median of "
        f"{args.trials}); what one save adds to them, median:"
    )
    for mode, values in costs.items():
        quartiles = statistics.quantiles(values)
        print(
            f"  {mode:<11} {statistics.median(values):6.2f} ms "
            f"(quartiles {quartiles[0]:.2f} to {quartiles[2]:.2f})"
        )


if __name__ == "__main__":
    main()
