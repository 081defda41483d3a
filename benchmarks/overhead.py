"""What the trainer costs per step over a hand-written loop doing the same work.

Each measurement runs in a fresh Python process (``--worker``) so no variant inherits
another's warm caches or Accelerate's process-wide state; the variants alternate
(their order rotates every repeat) so drift on a shared machine hits all of them, and
the table reports medians. Every worker pins ``torch.set_num_threads(1)``.

Variants (the work per step is the same: forward, cross-entropy, backward, clip the
gradient norm to 1.0, AdamW step, LinearLR step, zero the gradients; the loss is
read every 50 steps):

* ``pytorch``      a hand-written PyTorch loop: the limit.
* ``accelerate``   a hand-written Accelerate loop (``prepare``, ``accelerator.backward``,
                   ``accelerator.clip_grad_norm_``).
* ``trainer``      ``accel_hydra.Trainer``: clipping, a per-update scheduler, logging
                   every 50 steps without a writer, no checkpoints, no NaN guard.
* ``trainer_all``  ``Trainer`` with every mixin doing work: tensorboard every 50
                   steps, step checkpoints every 500 updates to a local directory,
                   early stopping on a (small) validation set, the NaN guard, the
                   progress bar (drawn into /dev/null).
* ``lightning``, ``ignite``  the same work in PyTorch Lightning and PyTorch-Ignite,
                   when installed (``pip install -e ".[bench]"``); skipped otherwise.

Workloads: ``tiny`` (MLP 32-64-10, batch 64: framework overhead dominates) and
``compute`` (MLP 512-2048-2048-10, batch 256: the arithmetic dominates).

Besides time it counts Python function calls per step (``sys.setprofile`` over the
timed epochs, in a separate process): exact and repeatable where times drift.

Run from the repository root::

    python benchmarks/overhead.py                    # both workloads, 7 repeats
    python benchmarks/overhead.py --workloads tiny --repeats 11 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

CORE_VARIANTS = ("pytorch", "accelerate", "trainer", "trainer_all")
OPTIONAL_VARIANTS = {"lightning": "lightning", "ignite": "ignite"}


@dataclass(frozen=True)
class Workload:
    widths: tuple[int, ...]
    batch_size: int
    batches_per_epoch: int
    warmup_epochs: int
    timed_epochs: int


WORKLOADS = {
    "tiny": Workload((32, 64, 10), 64, 250, 1, 8),
    "compute": Workload((512, 2048, 2048, 10), 256, 10, 1, 3),
}
LOG_EVERY = 50
MAX_GRAD_NORM = 1.0


# --------------------------------------------------------------------------- worker


class StepClock:
    """Times (or counts the Python calls of) the timed epochs of one run.

    It records wall time and the process's CPU time (all threads): on a shared
    machine the CPU time moves less when the process is descheduled.
    """

    def __init__(self, workload: Workload, count_calls: bool) -> None:
        self.workload = workload
        self.count_calls = count_calls
        self.calls = 0
        self.start = self.end = (0.0, 0.0)

    def epoch_started(self, epoch: int) -> None:
        if epoch == self.workload.warmup_epochs:
            if self.count_calls:
                sys.setprofile(self._count)
            self.start = (time.perf_counter(), time.process_time())

    def finished(self) -> None:
        self.end = (time.perf_counter(), time.process_time())
        sys.setprofile(None)

    def _count(self, frame, event, arg) -> None:
        if event == "call" or event == "c_call":
            self.calls += 1

    def result(self) -> dict:
        steps = self.workload.batches_per_epoch * self.workload.timed_epochs
        result = {
            "us_per_step": (self.end[0] - self.start[0]) / steps * 1e6,
            "cpu_us_per_step": (self.end[1] - self.start[1]) / steps * 1e6,
            "steps": steps,
        }
        if self.count_calls:
            result["calls_per_step"] = self.calls / steps
        return result


def build(workload: Workload):
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(workload.widths, workload.widths[1:], strict=False)):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(n_in, n_out))
    model = nn.Sequential(*layers)
    n = workload.batch_size * workload.batches_per_epoch
    x = torch.randn(n, workload.widths[0])
    y = torch.randint(0, workload.widths[-1], (n,))
    loader = DataLoader(
        TensorDataset(x, y), batch_size=workload.batch_size, shuffle=True, drop_last=True
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    total = workload.batches_per_epoch * (workload.warmup_epochs + workload.timed_epochs)
    scheduler = torch.optim.lr_scheduler.LinearLR(
        optimizer, start_factor=1.0, end_factor=0.1, total_iters=total
    )
    val = DataLoader(TensorDataset(x[:256], y[:256]), batch_size=workload.batch_size)
    return model, optimizer, scheduler, loader, val


def run_pytorch(workload: Workload, clock: StepClock) -> None:
    import torch
    from torch.nn.functional import cross_entropy

    model, optimizer, scheduler, loader, _ = build(workload)
    epochs = workload.warmup_epochs + workload.timed_epochs
    losses, step = [], 0
    for epoch in range(epochs):
        clock.epoch_started(epoch)
        model.train()
        for x, y in loader:
            loss = cross_entropy(model(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % LOG_EVERY == 0:
                losses.append(loss.item())
    clock.finished()


def run_accelerate(workload: Workload, clock: StepClock) -> None:
    from accelerate import Accelerator
    from torch.nn.functional import cross_entropy

    accelerator = Accelerator(cpu=True)
    model, optimizer, scheduler, loader, _ = build(workload)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    epochs = workload.warmup_epochs + workload.timed_epochs
    losses, step = [], 0
    for epoch in range(epochs):
        clock.epoch_started(epoch)
        model.train()
        for x, y in loader:
            loss = cross_entropy(model(x), y)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % LOG_EVERY == 0:
                losses.append(loss.item())
    clock.finished()


def run_trainer(workload: Workload, clock: StepClock, every_mixin: bool) -> None:
    from dataclasses import dataclass as trainer_dataclass

    from torch.nn.functional import cross_entropy

    from accel_hydra import MetricMonitor, Trainer

    @trainer_dataclass(kw_only=True, eq=False)
    class BenchTrainer(Trainer):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return cross_entropy(self.model(x), y)

        def on_validation_start(self):
            self.val_loss_sum, self.val_batches = 0.0, 0

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.val_loss_sum += cross_entropy(self.model(x), y)
            self.val_batches += 1

        def get_val_metrics(self):
            return {"loss": self.val_loss_sum / self.val_batches}

        def on_train_epoch_start(self):
            clock.epoch_started(self.epoch)

        def on_train_end(self):
            clock.finished()

    model, optimizer, scheduler, loader, val = build(workload)
    epochs = workload.warmup_epochs + workload.timed_epochs
    with tempfile.TemporaryDirectory() as project_dir:
        common = dict(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            train_dataloader=loader,
            epochs=epochs,
            project_dir=project_dir,
            max_grad_norm=MAX_GRAD_NORM,
            log_every_n_steps=LOG_EVERY,
            save_every_n_epochs=None,
        )
        if every_mixin:
            trainer = BenchTrainer(
                **common,
                val_dataloader=val,
                report_to="tensorboard",
                save_every_n_steps=500,
                metric_monitor=MetricMonitor(metric_name="loss", mode="min"),
                early_stop=epochs,
            )
        else:
            trainer = BenchTrainer(**common, report_to=None, stop_on_nan=False, progress_bar=False)
        with (
            open(os.devnull, "w") as sink,
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
        ):
            trainer.train(seed=0)


def run_lightning(workload: Workload, clock: StepClock) -> None:
    import lightning as L
    import torch
    from torch.nn.functional import cross_entropy

    model, optimizer, scheduler, loader, _ = build(workload)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = model

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = cross_entropy(self.net(x), y)
            self.log("train/loss", loss)  # reduced on Lightning's log_every_n_steps
            return loss

        def configure_optimizers(self):
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
            }

        def on_train_epoch_start(self):
            clock.epoch_started(self.current_epoch)

        def on_train_end(self):
            clock.finished()

    with tempfile.TemporaryDirectory() as root:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_epochs=workload.warmup_epochs + workload.timed_epochs,
            gradient_clip_val=MAX_GRAD_NORM,
            log_every_n_steps=LOG_EVERY,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=root,
        )
        torch.manual_seed(0)
        trainer.fit(Module(), loader)


def run_ignite(workload: Workload, clock: StepClock) -> None:
    import torch
    from ignite.engine import Engine, Events
    from torch.nn.functional import cross_entropy

    model, optimizer, scheduler, loader, _ = build(workload)
    losses = []

    def update(engine, batch):
        model.train()
        x, y = batch
        loss = cross_entropy(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    engine = Engine(update)
    engine.add_event_handler(Events.EPOCH_STARTED, lambda e: clock.epoch_started(e.state.epoch - 1))
    engine.add_event_handler(
        Events.ITERATION_COMPLETED(every=LOG_EVERY), lambda e: losses.append(e.state.output.item())
    )
    engine.add_event_handler(Events.COMPLETED, lambda e: clock.finished())
    engine.run(loader, max_epochs=workload.warmup_epochs + workload.timed_epochs)


def worker(variant: str, workload_name: str, count_calls: bool) -> dict:
    import torch

    torch.set_num_threads(1)
    workload = WORKLOADS[workload_name]
    clock = StepClock(workload, count_calls)
    if variant == "pytorch":
        run_pytorch(workload, clock)
    elif variant == "accelerate":
        run_accelerate(workload, clock)
    elif variant in ("trainer", "trainer_all"):
        run_trainer(workload, clock, every_mixin=variant == "trainer_all")
    elif variant == "lightning":
        run_lightning(workload, clock)
    elif variant == "ignite":
        run_ignite(workload, clock)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return clock.result()


# --------------------------------------------------------------------------- parent


def measure(variant: str, workload: str, count_calls: bool = False) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--workload", workload]
    if count_calls:
        command.append("--count-calls")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"{variant}/{workload} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def available_variants(requested: list[str] | None) -> list[str]:
    variants = list(CORE_VARIANTS)
    for name, module in OPTIONAL_VARIANTS.items():
        if importlib.util.find_spec(module) is not None:
            variants.append(name)
        else:
            print(f"note: {name} is not installed; skipped (pip install -e '.[bench]')")
    if requested:
        variants = [v for v in variants if v in requested]
    return variants


def versions() -> dict:
    import accelerate
    import torch

    found = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
    }
    for module in ("lightning", "ignite"):
        if importlib.util.find_spec(module) is not None:
            found[module] = __import__(module).__version__
    return found


def table(results: dict, variants: list[str]) -> str:
    lines = []
    for workload, per_variant in results.items():
        base = statistics.median(per_variant["pytorch"]["us"])
        acc = statistics.median(per_variant["accelerate"]["us"])
        lines.append(f"{workload} ({'-'.join(map(str, WORKLOADS[workload].widths))})")
        lines.append(
            f"  {'variant':<12} {'us/step':>9} {'min..max':>15} {'vs pytorch':>10} "
            f"{'vs accelerate':>13} {'calls/step':>10}"
        )
        for variant in variants:
            row = per_variant[variant]
            med = statistics.median(row["us"])
            spread = f"{min(row['us']):.0f}..{max(row['us']):.0f}"
            calls = row.get("calls_per_step")
            calls_text = f"{calls:.0f}" if calls is not None else "-"
            lines.append(
                f"  {variant:<12} {med:>9.1f} {spread:>15} {med / base:>9.3f}x "
                f"{med / acc:>12.3f}x {calls_text:>10}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--count-calls", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workloads", default="tiny,compute", help="comma-separated")
    parser.add_argument("--variants", default=None, help="comma-separated subset")
    parser.add_argument("--repeats", type=int, default=7, help="runs per variant (>= 5)")
    parser.add_argument("--no-calls", action="store_true", help="skip the call counts")
    parser.add_argument("--json", metavar="PATH", help="also write the raw results here")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.workload, args.count_calls)))
        return
    if args.repeats < 5:
        parser.error("--repeats must be >= 5: a median of fewer runs is noise here")
    variants = available_variants(args.variants.split(",") if args.variants else None)
    for needed in ("pytorch", "accelerate"):
        if needed not in variants:
            variants.insert(0, needed)
    results: dict = {}
    for workload in args.workloads.split(","):
        per_variant = {v: {"us": []} for v in variants}
        for repeat in range(args.repeats):
            shift = repeat % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                us = measure(variant, workload)["us_per_step"]
                per_variant[variant]["us"].append(us)
                print(f"{workload} repeat {repeat + 1}/{args.repeats} {variant:<12} {us:9.1f} us")
        if not args.no_calls:
            for variant in variants:
                per_variant[variant]["calls_per_step"] = measure(variant, workload, True)[
                    "calls_per_step"
                ]
        results[workload] = per_variant
    print()
    print(f"{time.strftime('%Y-%m-%d')}  " + "  ".join(f"{k} {v}" for k, v in versions().items()))
    print(f"median of {args.repeats} fresh processes per variant, torch.set_num_threads(1)")
    print(table(results, variants))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"versions": versions(), "results": results}, out, indent=2)


if __name__ == "__main__":
    main()
