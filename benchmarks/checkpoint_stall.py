"""How long training stalls on a checkpoint save, by state size, and how fast it resumes.

Starts its own S3 server (moto, on 127.0.0.1). For each size in ``--sizes`` (MB of
training state: weights plus AdamW's two moments, a stack of 1024x1024 linear layers
sized to it) it trains the same model with saves every ``--save-every`` updates, to a
local directory and to ``s3://``, with ``async_save`` on and off, and reports the
*stall* of a save (the time the training thread spends inside ``save_checkpoint``, the
save before it already finished)
next to a plain ``torch.save`` of the same state and a memory copy of it into host
buffers (the floor of any consistent save). It then times a resume (fetch, checksums,
code-free check, load) from the local checkpoint against reading the same tensors with
``safetensors``/``torch.load``. ``--plot FILE`` draws stall vs size (needs matplotlib).

``--upload-throughput`` instead runs the earlier comparison: the background upload
against a plain ``fs.put`` of the same files, at ``--width``.

Run from the repository root (needs ``pip install -e ".[test]"`` for s3fs and moto)::

    python benchmarks/checkpoint_stall.py --sizes 13,200 --plot benchmarks/checkpoint_stall.png
    python benchmarks/checkpoint_stall.py --upload-throughput --width 2048
"""

from __future__ import annotations

import argparse
import json
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

    def commit(self, name, staged, info, callback=None):
        size = sum(staged_files(staged).values())
        start = time.perf_counter()
        super().commit(name, staged, info, callback)
        self.commits.append((time.perf_counter() - start, size))


@dataclass(kw_only=True, eq=False)
class StallTrainer(Trainer):
    """Regression trainer that times every save as the training thread sees it."""

    stalls: list = field(default_factory=list)
    #: Wait for the save in flight before the timer starts: the stall of the save alone.
    settle: bool = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def validation_step(self, batch, batch_idx):
        pass

    def save_checkpoint(self, name):
        if self.settle:
            self.wait_for_uploads()
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


def stall_trainer(model, lr, loader, args, project_dir, checkpoint_dir, storage_options, **extra):
    """A one-epoch StallTrainer saving every ``args.save_every`` updates, AdamW at ``lr``."""
    return StallTrainer(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=lr),
        train_dataloader=loader,
        epochs=1,
        project_dir=project_dir,
        progress_bar=False,
        report_to=None,
        checkpoint_dir=checkpoint_dir,
        storage_options=storage_options,
        save_every_n_steps=args.save_every,
        save_every_n_epochs=None,
        **extra,
    )


def run(args, project_dir, checkpoint_dir, storage_options=None, async_upload=True):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, args.width), nn.ReLU(), nn.Linear(args.width, args.width),
        nn.ReLU(), nn.Linear(args.width, 1),
    )  # fmt: skip
    data = TensorDataset(torch.randn(args.batches * 32, 64), torch.randn(args.batches * 32, 1))
    trainer = stall_trainer(
        model, 1e-3, DataLoader(data, batch_size=32, shuffle=True), args, project_dir,
        checkpoint_dir, storage_options, save_last_k=2, async_upload=async_upload,
    )  # fmt: skip
    trainer.checkpoint_store = TimedStore(checkpoint_dir, storage_options)
    start = time.perf_counter()
    trainer.train(seed=0)
    return trainer, time.perf_counter() - start


def upload_throughput(args) -> None:
    """The background upload against a plain ``fs.put`` (the earlier benchmark)."""
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


_WIDTH = 1024


def stacked_model(state_mb: float) -> nn.Module:
    """Linear layers of 1024x1024 whose weights and AdamW moments total ``state_mb`` MB."""
    per_layer = 3 * 4 * (_WIDTH * _WIDTH + _WIDTH)
    layers = max(1, round(state_mb * 1e6 / per_layer))
    return nn.Sequential(*(nn.Linear(_WIDTH, _WIDTH) for _ in range(layers)))


def sized_run(size, args, project_dir, checkpoint_dir, storage_options=None, async_save=True):
    torch.manual_seed(0)
    model = stacked_model(size)
    n = args.batches * 8
    data = TensorDataset(torch.randn(n, _WIDTH), torch.randn(n, _WIDTH))
    trainer = stall_trainer(
        model, 1e-4, DataLoader(data, batch_size=8, shuffle=True), args, project_dir,
        checkpoint_dir, storage_options, save_last_k=1, async_save=async_save, settle=True,
    )  # fmt: skip
    trainer.train(seed=0)
    return trainer


def state_tensors(trainer) -> list[torch.Tensor]:
    tensors = list(trainer.model.state_dict().values())
    for state in trainer.optimizer.state_dict()["state"].values():
        tensors.extend(v for v in state.values() if isinstance(v, torch.Tensor))
    return tensors


def floors(trainer, directory: str, repeats: int = 3) -> tuple[float, float, int]:
    """Seconds of a memory copy into reused host buffers, and of a plain torch.save."""
    tensors = state_tensors(trainer)
    buffers = [torch.empty_like(t) for t in tensors]
    for buffer, tensor in zip(buffers, tensors, strict=True):
        buffer.copy_(tensor)  # fault the pages in, as reused snapshot buffers are
    copies, saves = [], []
    path = os.path.join(directory, "plain.pt")
    for _ in range(repeats):
        start = time.perf_counter()
        for buffer, tensor in zip(buffers, tensors, strict=True):
            buffer.copy_(tensor)
        copies.append(time.perf_counter() - start)
        start = time.perf_counter()
        state = {"model": trainer.model.state_dict(), "optimizer": trainer.optimizer.state_dict()}
        torch.save(state, path)
        saves.append(time.perf_counter() - start)
        os.remove(path)
    return min(copies), statistics.median(saves), sum(t.nbytes for t in tensors)


def load_times(trainer, checkpoint: str, repeats: int = 3) -> tuple[float, float]:
    """Seconds of a resume from ``checkpoint`` (verify + load) and of a raw tensor load
    (``safetensors``/``torch.load`` into the model and the optimizer)."""
    from safetensors.torch import load_file

    store, name = trainer.checkpoint_store, os.path.basename(checkpoint)
    ours, raw = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        trainer._restore_from(store, name)
        ours.append(time.perf_counter() - start)
        # The same tensors read into the same model and optimizer, nothing checked.
        start = time.perf_counter()
        model = trainer.accelerator.unwrap_model(trainer.model)
        model.load_state_dict(load_file(os.path.join(checkpoint, "model.safetensors")))
        path = os.path.join(checkpoint, "optimizer.bin")
        trainer.optimizer.load_state_dict(torch.load(path, weights_only=True))
        raw.append(time.perf_counter() - start)
    return statistics.median(ours), statistics.median(raw)


def size_axis(args) -> None:
    sizes = [float(s) for s in args.sizes.split(",")]
    results = []
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
        for size in sizes:
            row: dict = {"size_mb": size}
            with tempfile.TemporaryDirectory() as tmp:
                for async_save in (True, False):
                    mode = "async" if async_save else "sync"
                    local = sized_run(
                        size, args, tmp, os.path.join(tmp, f"ckpt_{mode}"), async_save=async_save
                    )
                    row[f"local_{mode}_s"] = statistics.median(local.stalls)
                    row[f"local_{mode}_first_s"] = local.stalls[0]
                    row[f"local_{mode}_all_s"] = local.stalls
                    if args.local_only:
                        continue
                    remote = sized_run(
                        size, args, tmp, f"s3://{bucket}/{size}/{mode}", options, async_save
                    )
                    row[f"s3_{mode}_s"] = statistics.median(remote.stalls)
                    del remote
                copy_s, save_s, nbytes = floors(local, tmp)
                row.update(memory_copy_s=copy_s, torch_save_s=save_s, state_bytes=nbytes)
                newest = local.checkpoint_store.latest()
                ours, raw = load_times(local, local.checkpoint_store.path(newest))
                row.update(resume_load_s=ours, raw_load_s=raw)
                del local
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        os.kill(server.pid, signal.SIGTERM)
        server.wait()
    print()
    print("| state | memory copy | torch.save | local stall sync | local stall async "
          "| S3 stall sync | S3 stall async | async/copy | async/sync | resume load "
          "| raw load | load/raw |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['state_bytes'] / 1e6:.0f} MB | {r['memory_copy_s'] * 1e3:.0f} ms "
            f"| {r['torch_save_s'] * 1e3:.0f} ms | {r['local_sync_s'] * 1e3:.0f} ms "
            f"| {r['local_async_s'] * 1e3:.0f} ms | {r.get('s3_sync_s', 0) * 1e3:.0f} ms "
            f"| {r.get('s3_async_s', 0) * 1e3:.0f} ms "
            f"| {r['local_async_s'] / r['memory_copy_s']:.2f}x "
            f"| {r['local_async_s'] / r['local_sync_s']:.2f}x | {r['resume_load_s'] * 1e3:.0f} ms "
            f"| {r['raw_load_s'] * 1e3:.0f} ms | {r['resume_load_s'] / r['raw_load_s']:.2f}x |"
        )
    if args.json:
        existing = []
        if os.path.exists(args.json):
            with open(args.json) as f:
                existing = [r for r in json.load(f) if r["size_mb"] not in sizes]
        with open(args.json, "w") as f:
            json.dump(sorted(existing + results, key=lambda r: r["size_mb"]), f, indent=1)
    if args.plot:
        if args.json:
            with open(args.json) as f:
                results = json.load(f)
        plot(results, args.plot)


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [r["state_bytes"] / 1e6 for r in results]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in [
        ("local_sync_s", "local, async_save=False"),
        ("s3_sync_s", "S3, async_save=False"),
        ("torch_save_s", "plain torch.save"),
        ("local_async_s", "local, async_save=True"),
        ("s3_async_s", "S3, async_save=True"),
        ("memory_copy_s", "memory copy (floor)"),
    ]:
        ax.plot(sizes, [r[key] for r in results], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training state (MB)")
    ax.set_ylabel("training stall per save (s)")
    ax.set_title("Checkpoint stall vs state size (2-core CPU VM)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="13,200", help="MB of training state, comma-separated")
    parser.add_argument("--batches", type=int, default=12, help="updates per run (sizes)")
    parser.add_argument("--save-every", type=int, default=4, help="updates between saves")
    parser.add_argument("--local-only", action="store_true", help="skip the S3 runs")
    parser.add_argument("--json", default=None, help="keep the rows in this JSON file")
    parser.add_argument("--plot", default=None, help="write a PNG of stall vs size here")
    parser.add_argument("--upload-throughput", action="store_true", help="the upload benchmark")
    parser.add_argument("--width", type=int, default=1024, help="MLP width (upload benchmark)")
    parser.add_argument("--idle-repeats", type=int, default=5, help="uploads timed at rest")
    args = parser.parse_args()
    if args.upload_throughput:
        args.batches, args.save_every = 200, 40
        upload_throughput(args)
    else:
        size_axis(args)


if __name__ == "__main__":
    main()
