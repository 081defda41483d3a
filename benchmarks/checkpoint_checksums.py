"""What the per-file checksums cost: added save and load time, 13 MB and 500 MB checkpoints.

Trains an MLP with AdamW (a checkpoint is about 12 bytes per parameter: weights and two
moments) and saves a local checkpoint after every update, as a user would. Each save
is timed as the training thread sees it (``save_checkpoint``), and inside it the time
spent checksumming the staged files; the rest is what a save without checksums costs.
Then the newest checkpoint is loaded several times: the verification
(``CheckpointStore.fetch``, which checks every size and checksum) against the load
itself (``load_checkpoint``). Medians; the page cache is warm, as it is right after a
save (the worst case for the ratio: on a cold cache verification reads the files from
disk and the load then finds them in memory).

Run from the repository root::

    python benchmarks/checkpoint_checksums.py
    python benchmarks/checkpoint_checksums.py --sizes 13 --saves 10
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

# The same trainer times saves for both benchmarks (this folder is on sys.path when a
# script in it runs).
from checkpoint_stall import StallTrainer  # noqa: E402
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import accel_hydra.storage as storage


def timed_checksums(spent: list):
    """``staged_records`` as the store calls it, recording how long each call took."""
    original = storage.staged_records

    def wrapper(staged):
        start = time.perf_counter()
        records = original(staged)
        spent.append(time.perf_counter() - start)
        return records

    return wrapper


def measure(megabytes: float, saves: int, loads: int) -> dict:
    width = int((megabytes * 1e6 / 12) ** 0.5)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width),
                          nn.ReLU(), nn.Linear(width, 1))  # fmt: skip
    data = TensorDataset(torch.randn(saves * 8, 64), torch.randn(saves * 8, 1))
    hashing: list[float] = []
    storage.staged_records = timed_checksums(hashing)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = StallTrainer(
            model=model,
            optimizer=torch.optim.AdamW(model.parameters(), lr=1e-4),
            train_dataloader=DataLoader(data, batch_size=8),
            epochs=1,
            project_dir=tmp,
            progress_bar=False,
            report_to=None,
            save_every_n_steps=1,
            save_every_n_epochs=None,
            save_last_k=1,
        )
        trainer.train(seed=0)
        store = trainer.checkpoint_store
        name = store.latest()
        size = sum(storage.staged_files(store.path(name)).values())
        verify, load = [], []
        for _ in range(loads):
            start = time.perf_counter()
            local = store.fetch(name)
            verify.append(time.perf_counter() - start)
            start = time.perf_counter()
            trainer.load_checkpoint(local)
            load.append(time.perf_counter() - start)
    save = statistics.median(trainer.stalls[1:])  # the first save also creates the folders
    checksum = statistics.median(hashing[1:])
    return {
        "size": size,
        "save": save - checksum,
        "checksum": checksum,
        "load": statistics.median(load),
        "verify": statistics.median(verify),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[13, 500], help="MB")
    parser.add_argument("--saves", type=int, default=8, help="saves timed per size")
    parser.add_argument("--loads", type=int, default=5, help="loads timed per size")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; medians")
    print("checkpoint   save w/o checksums  + checksums        load   + verification")
    for megabytes in args.sizes:
        r = measure(megabytes, args.saves, args.loads)
        print(f"{r['size'] / 1e6:7.1f} MB  {r['save'] * 1e3:12.1f} ms  "
              f"{r['checksum'] * 1e3:8.1f} ms ({r['checksum'] / r['save']:5.1%})  "
              f"{r['load'] * 1e3:8.1f} ms  {r['verify'] * 1e3:8.1f} ms "
              f"({r['verify'] / r['load']:5.1%})")  # fmt: skip


if __name__ == "__main__":
    main()
