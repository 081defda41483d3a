"""How long training stalls on a checkpoint save: S3 with background upload vs local disk.

Starts its own S3 server (moto, on 127.0.0.1), then trains the same model three times in
this process, saving every ``--save-every`` updates: to a local directory, to ``s3://``
with ``async_upload=True``, and to ``s3://`` with ``async_upload=False``. The stall of a
save is the time the training thread spends inside ``save_checkpoint``.
It also times the background uploads against a plain ``fs.put`` of the same files.

Run from the repository root (needs ``pip install -e ".[test]"`` for s3fs and moto)::

    python benchmarks/checkpoint_stall.py
    python benchmarks/checkpoint_stall.py --width 2048 --save-every 20
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import fsspec
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from accel_hydra import Trainer
from accel_hydra.storage import CheckpointStore, staged_files
from accel_hydra.uploader import BackgroundUploader


class TimedStore(CheckpointStore):
    """A store that records how long each commit (upload + marker) took, and its bytes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.commits: list[tuple[float, int]] = []

    def commit(self, name, staged, info):
        size = sum(staged_files(staged).values())
        start = time.perf_counter()
        super().commit(name, staged, info)
        self.commits.append((time.perf_counter() - start, size))


@dataclass(kw_only=True, eq=False)
class StallTrainer(Trainer):
    """Regression trainer that times every save as the training thread sees it."""

    stalls: list = field(default_factory=list)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def save_checkpoint(self, name):
        start = time.perf_counter()
        saved = super().save_checkpoint(name)
        self.stalls.append(time.perf_counter() - start)
        return saved


def start_moto() -> tuple[subprocess.Popen, int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return server, port
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("moto's server did not start; is moto[server] installed?")


def run(args, project_dir, checkpoint_dir, storage_options=None, async_upload=True):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, args.width), nn.ReLU(), nn.Linear(args.width, args.width),
        nn.ReLU(), nn.Linear(args.width, 1),
    )  # fmt: skip
    data = TensorDataset(torch.randn(args.batches * 32, 64), torch.randn(args.batches * 32, 1))
    trainer = StallTrainer(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        train_dataloader=DataLoader(data, batch_size=32, shuffle=True),
        epochs=1,
        project_dir=project_dir,
        progress_bar=False,
        report_to=None,
        checkpoint_dir=checkpoint_dir,
        storage_options=storage_options,
        save_every_n_steps=args.save_every,
        save_every_n_epochs=None,
        save_last_k=2,
        async_upload=async_upload,
    )
    trainer.checkpoint_store = TimedStore(checkpoint_dir, storage_options)
    start = time.perf_counter()
    trainer.train(seed=0)
    return trainer, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1024, help="hidden width of the MLP")
    parser.add_argument("--batches", type=int, default=200, help="updates in the run")
    parser.add_argument("--save-every", type=int, default=40, help="updates between saves")
    parser.add_argument("--idle-repeats", type=int, default=5, help="uploads timed at rest")
    args = parser.parse_args()

    server, port = start_moto()
    try:
        options = {
            "key": "benchmark",
            "secret": "benchmark",
            "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}"},
        }
        fs = fsspec.filesystem("s3", **options)
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        fs.mkdir(bucket)
        with tempfile.TemporaryDirectory() as tmp:
            local, local_wall = run(args, tmp, os.path.join(tmp, "checkpoints"))
            remote, remote_wall = run(args, tmp, f"s3://{bucket}/run", options)
            blocking, blocking_wall = run(args, tmp, f"s3://{bucket}/sync", options, False)
            # The same files, with nothing else running: a plain fs.put, and our whole
            # upload path (stage copy excluded) on the background thread, alternately.
            newest = local.checkpoint_store.latest()
            folder = local.checkpoint_store.path(newest)
            size = sum(staged_files(folder).values())
            plain_times, ours_times = [], []
            store = CheckpointStore(f"s3://{bucket}/idle", options)
            uploader = BackgroundUploader()
            for i in range(args.idle_repeats):
                start = time.perf_counter()
                fs.put(folder + "/", f"{bucket}/plain/{i}/", recursive=True)
                plain_times.append(time.perf_counter() - start)
                stage = shutil.copytree(folder, os.path.join(tmp, f"stage_{i}"))
                info = {"step": i, "epoch": 0}
                start = time.perf_counter()
                uploader.submit(lambda s=stage, n=f"step_{i}", m=info: store.commit(n, s, m), "")
                uploader.wait()
                ours_times.append(time.perf_counter() - start)
            plain_seconds = statistics.median(plain_times)
            idle_seconds = statistics.median(ours_times)
    finally:
        os.kill(server.pid, signal.SIGTERM)
        server.wait()

    local_stall = statistics.median(local.stalls)
    remote_stall = statistics.median(remote.stalls)
    upload_seconds = statistics.median(t for t, _ in remote.checkpoint_store.commits)
    upload_bytes = remote.checkpoint_store.commits[0][1]
    background_mb_s = upload_bytes / upload_seconds / 1e6
    plain_mb_s = size / plain_seconds / 1e6
    params = sum(p.numel() for p in local.model.parameters())
    print(f"model: {params / 1e6:.1f}M parameters, checkpoint {size / 1e6:.1f} MB, "
          f"{len(local.stalls)} saves in {args.batches} updates")  # fmt: skip
    print(f"local disk:              median stall per save {local_stall * 1e3:8.1f} ms, "
          f"run {local_wall:6.2f} s")  # fmt: skip
    print(f"s3 (background):         median stall per save {remote_stall * 1e3:8.1f} ms, "
          f"run {remote_wall:6.2f} s (includes waiting for the last upload)")  # fmt: skip
    blocking_stall = statistics.median(blocking.stalls)
    print(f"s3 (async_upload=False): median stall per save {blocking_stall * 1e3:8.1f} ms, "
          f"run {blocking_wall:6.2f} s")  # fmt: skip
    print(f"stall ratio s3/local: {remote_stall / local_stall:.2f} "
          f"(without the background upload: {blocking_stall / local_stall:.2f})")  # fmt: skip
    idle_mb_s = size / idle_seconds / 1e6
    print(f"plain fs.put:            {plain_mb_s:8.1f} MB/s (median of {args.idle_repeats}, "
          "nothing else running)")  # fmt: skip
    print(f"background upload, idle: {idle_mb_s:8.1f} MB/s (median of {args.idle_repeats}, "
          "same files, commit marker included)")  # fmt: skip
    uploads = len(remote.checkpoint_store.commits)
    print(f"background upload, training: {background_mb_s:4.1f} MB/s (median of {uploads} "
          "uploads, sharing the CPU with training)")  # fmt: skip
    print(f"throughput ratio background/plain: {idle_mb_s / plain_mb_s:.2f} idle, "
          f"{background_mb_s / plain_mb_s:.2f} while training")  # fmt: skip


if __name__ == "__main__":
    main()
