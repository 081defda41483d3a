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
                   every 50 steps without a writer, no checkpoints, the default
                   (sync-free) NaN guard.
* ``trainer_all``  ``Trainer`` with every mixin doing work: tensorboard every 50
                   steps, step checkpoints every 500 updates to a local directory,
                   early stopping on a (small) validation set, the NaN guard, the
                   progress bar (drawn into /dev/null).
* ``pytorch_all``  the hand-written PyTorch loop doing ``trainer_all``'s work: the loss
                   and learning rate to tensorboardX every 50 steps, the same
                   validation each epoch (its loss logged too), and a careful
                   checkpoint (model, optimizer, scheduler, RNG states in one
                   ``torch.save``, flushed to disk, renamed into place, the older
                   one deleted) every 500 updates and as ``best`` when the
                   validation loss improves. No progress bar. ``trainer_all`` over
                   ``pytorch_all`` is what the mixins cost over that work by hand.
* ``lightning``, ``ignite``  the same work in PyTorch Lightning and PyTorch-Ignite,
                   when installed (``pip install -e ".[bench]"``); skipped otherwise.

Workloads: ``tiny`` (MLP 32-64-10, batch 64: framework overhead dominates) and
``compute`` (MLP 512-2048-2048-10, batch 256: the arithmetic dominates).

Besides time it counts function calls per step (``sys.setprofile`` over the timed
epochs, in a separate process): exact and repeatable where times drift. ``calls/step``
counts Python and C calls, ``py calls`` the Python ones only; a last line gives the
Python calls per step of ``LoopBase`` with 0 to 5 of ``Trainer``'s mixins
(``mixins<k>`` workers; without LRSchedulingMixin/GradClipMixin the scheduler and
clipping do not run, so read the bracketed accel_hydra-only count for the trainer's
own share).

Run from the repository root::

    python benchmarks/overhead.py                    # both workloads, 7 repeats
    python benchmarks/overhead.py --workloads tiny --repeats 11 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass

CORE_VARIANTS = ("pytorch", "accelerate", "trainer", "trainer_all", "pytorch_all")
OPTIONAL_VARIANTS = {"lightning": "lightning", "ignite": "ignite"}


@dataclass(frozen=True)
class Workload:
    widths: tuple[int, ...]
    batch_size: int
    batches_per_epoch: int
    warmup_epochs: int
    timed_epochs: int


WORKLOADS = {
    "tiny": Workload((32, 64, 10), 64, 500, 1, 5),
    "compute": Workload((512, 2048, 2048, 10), 256, 10, 1, 5),
}
LOG_EVERY = 50
MAX_GRAD_NORM = 1.0


# --------------------------------------------------------------------------- worker


class StepClock:
    """Times (or counts the Python calls of) the timed epochs of one run.

    Each timed epoch is timed on its own and the run reports the median epoch: a slow
    spell on a shared machine then spoils one epoch, not the run. Epoch-end work (the
    trainer's loss read, validation, the checkpoint that ends each ``tiny`` epoch) is
    part of the epoch it ends.
    """

    def __init__(self, workload: Workload, count_calls: bool, by_function: bool = False) -> None:
        self.workload = workload
        self.count_calls = count_calls or by_function
        self.by_function: Counter | None = Counter() if by_function else None
        self.calls = 0
        self.python_calls = 0
        self.own_calls = 0
        self.marks: list[float] = []

    def epoch_started(self, epoch: int) -> None:
        if epoch == self.workload.warmup_epochs and self.count_calls:
            sys.setprofile(self._count)
        if epoch >= self.workload.warmup_epochs:
            self.marks.append(time.perf_counter())

    def finished(self) -> None:
        self.marks.append(time.perf_counter())
        sys.setprofile(None)

    def _count(self, frame, event, arg) -> None:
        if event == "call" or event == "c_call":
            self.calls += 1
            if event == "call":
                self.python_calls += 1
                if _OWN_PACKAGE in frame.f_code.co_filename:
                    self.own_calls += 1
            if self.by_function is not None:
                self.by_function[_where(frame, event, arg)] += 1

    def result(self) -> dict:
        per_epoch = self.workload.batches_per_epoch
        bounds = zip(self.marks, self.marks[1:], strict=False)
        epochs = [(end - start) / per_epoch * 1e6 for start, end in bounds]
        if len(epochs) != self.workload.timed_epochs:
            raise RuntimeError(f"timed {len(epochs)} epochs, expected {self.workload.timed_epochs}")
        result = {"us_per_step": statistics.median(epochs), "epochs_us_per_step": epochs}
        steps = per_epoch * self.workload.timed_epochs
        if self.count_calls:
            result["calls_per_step"] = self.calls / steps
            result["python_calls_per_step"] = self.python_calls / steps
            result["own_calls_per_step"] = self.own_calls / steps
        if self.by_function is not None:
            result["by_function"] = {k: n / steps for k, n in self.by_function.most_common()}
        return result


#: Frames of the trainer package itself (its own per-step work, apart from torch's).
_OWN_PACKAGE = os.sep + "accel_hydra" + os.sep


def _where(frame, event: str, arg) -> str:
    """``package/file.py:function`` of a Python call, ``C:name`` of a builtin."""
    if event == "c_call":
        return f"C:{getattr(arg, '__qualname__', arg)}"
    path = frame.f_code.co_filename
    for marker in ("site-packages" + os.sep, os.sep + "lib" + os.sep):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{frame.f_code.co_name}"


@contextlib.contextmanager
def quietly():
    """Send a trainer's summaries and progress bar to /dev/null (still drawn, not shown)."""
    with (
        open(os.devnull, "w") as sink,
        contextlib.redirect_stdout(sink),
        contextlib.redirect_stderr(sink),
    ):
        yield


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


def hand_written_epoch(
    model, optimizer, scheduler, loader, step: int, on_log, save_every=0, on_save=None
) -> int:
    """One epoch of the hand-written PyTorch loop; the update count after it.

    ``on_log(step, loss)`` runs every ``LOG_EVERY`` updates, ``on_save(step)`` every
    ``save_every`` (no call per update otherwise, as a loop written by hand).
    """
    import torch
    from torch.nn.functional import cross_entropy

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
            on_log(step, loss)
        if save_every and step % save_every == 0:
            on_save(step)
    return step


def run_pytorch(workload: Workload, clock: StepClock) -> None:
    model, optimizer, scheduler, loader, _ = build(workload)
    epochs = workload.warmup_epochs + workload.timed_epochs
    losses: list[float] = []
    step = 0
    for epoch in range(epochs):
        clock.epoch_started(epoch)
        step = hand_written_epoch(
            model, optimizer, scheduler, loader, step, lambda _, loss: losses.append(loss.item())
        )
    clock.finished()


def run_pytorch_all(workload: Workload, clock: StepClock) -> None:
    import random

    import numpy as np
    import torch
    from tensorboardX import SummaryWriter
    from torch.nn.functional import cross_entropy

    model, optimizer, scheduler, loader, val = build(workload)
    epochs = workload.warmup_epochs + workload.timed_epochs

    def save(path: str, step: int) -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()),
            "step": step,
        }
        with open(path + ".tmp", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)

    with tempfile.TemporaryDirectory() as project_dir:
        writer = SummaryWriter(os.path.join(project_dir, "logs"))
        saved: list[str] = []

        def log(step: int, loss) -> None:
            writer.add_scalar("train/loss", loss.item(), step)
            writer.add_scalar("train/lr", scheduler.get_last_lr()[0], step)

        def save_step(step: int) -> None:
            saved.append(os.path.join(project_dir, f"step_{step}.pt"))
            save(saved[-1], step)
            if len(saved) > 1:
                os.remove(saved.pop(0))

        step, best = 0, float("inf")
        for epoch in range(epochs):
            clock.epoch_started(epoch)
            step = hand_written_epoch(
                model, optimizer, scheduler, loader, step, log, 500, save_step
            )
            model.eval()
            with torch.no_grad():
                val_loss = float(sum(cross_entropy(model(x), y) for x, y in val) / len(val))
            writer.add_scalar("val/loss", val_loss, step)
            if val_loss < best:
                best = val_loss
                save(os.path.join(project_dir, "best.pt"), step)
        writer.close()
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


#: The mixins of ``Trainer``, in the order ``mixins<k>`` composes the first ``k``.
MIXIN_ORDER = (
    "CheckpointMixin",
    "EarlyStoppingMixin",
    "LoggingMixin",
    "LRSchedulingMixin",
    "GradClipMixin",
)


def run_trainer(
    workload: Workload, clock: StepClock, every_mixin: bool, mixins: int | None = None
) -> None:
    from dataclasses import dataclass as trainer_dataclass

    from torch.nn.functional import cross_entropy

    import accel_hydra
    from accel_hydra import LoopBase, MetricMonitor, Trainer

    if mixins is None:
        base: type = Trainer
    else:  # the first `mixins` of MIXIN_ORDER over LoopBase, in Trainer's MRO order
        chosen = [getattr(accel_hydra, name) for name in MIXIN_ORDER[:mixins]]
        ordered = [k for k in Trainer.__mro__ if k in chosen]
        base = trainer_dataclass(kw_only=True, eq=False)(
            type(f"Mixins{mixins}", (*ordered, LoopBase), {})
        )

    @trainer_dataclass(kw_only=True, eq=False)
    class BenchTrainer(base):  # type: ignore[valid-type,misc]
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
        if mixins is not None:
            fields = {f.name for f in dataclasses.fields(BenchTrainer)}
            common = {k: v for k, v in common.items() if k in fields}
            if "report_to" in fields:
                common["report_to"] = None
            trainer = BenchTrainer(**common, progress_bar=False)
        elif every_mixin:
            trainer = BenchTrainer(
                **common,
                val_dataloader=val,
                report_to="tensorboard",
                save_every_n_steps=500,
                metric_monitor=MetricMonitor(metric_name="loss", mode="min"),
                early_stop=epochs,
            )
        else:
            trainer = BenchTrainer(**common, report_to=None, progress_bar=False)
        with quietly():
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


def run_upstream(workload: Workload, clock: StepClock) -> None:
    """The upstream AccelHydra (PyPI ``accel-hydra``), imported from ``--upstream DIR``."""
    from dataclasses import dataclass as trainer_dataclass

    from torch import nn

    import accel_hydra
    from accel_hydra import Trainer

    if not hasattr(accel_hydra, "train_launcher"):
        raise RuntimeError(f"{accel_hydra.__file__} is not the upstream AccelHydra")

    @trainer_dataclass(kw_only=True)
    class UpstreamTrainer(Trainer):
        def training_step(self, batch, batch_idx):
            x, y = batch
            return self.loss_fn(self.model(x), y)

        def validation_step(self, batch, batch_idx):
            pass

        def on_train_epoch_start(self):
            clock.epoch_started(self.epoch)
            super().on_train_epoch_start()

        def on_train_end(self):
            clock.finished()
            super().on_train_end()

    model, optimizer, scheduler, loader, _ = build(workload)
    with tempfile.TemporaryDirectory() as project_dir:
        trainer = UpstreamTrainer(
            project_dir=project_dir,
            train_dataloader=loader,
            val_dataloader=None,
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            loss_fn=nn.CrossEntropyLoss(),
            epochs=workload.warmup_epochs + workload.timed_epochs,
            max_grad_norm=MAX_GRAD_NORM,
            log_every_n_steps=LOG_EVERY,
            save_every_n_epochs=None,
        )
        with quietly():
            trainer.train(seed=0)


def worker(variant: str, workload_name: str, count_calls: bool, by_function: bool = False) -> dict:
    import torch

    torch.set_num_threads(1)
    workload = WORKLOADS[workload_name]
    clock = StepClock(workload, count_calls, by_function)
    if variant == "pytorch":
        run_pytorch(workload, clock)
    elif variant == "accelerate":
        run_accelerate(workload, clock)
    elif variant == "pytorch_all":
        run_pytorch_all(workload, clock)
    elif variant in ("trainer", "trainer_all"):
        run_trainer(workload, clock, every_mixin=variant == "trainer_all")
    elif variant.startswith("mixins"):
        run_trainer(workload, clock, every_mixin=False, mixins=int(variant[len("mixins") :]))
    elif variant == "lightning":
        run_lightning(workload, clock)
    elif variant == "ignite":
        run_ignite(workload, clock)
    elif variant == "upstream":
        run_upstream(workload, clock)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    return clock.result()


# --------------------------------------------------------------------------- parent


def measure(
    variant: str, workload: str, count_calls: bool = False, upstream: str = "", by_function=False
) -> dict:
    command = [sys.executable, __file__, "--worker", variant, "--workload", workload]
    if count_calls:
        command.append("--count-calls")
    if by_function:
        command += ["--breakdown", "-"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    if variant == "upstream":  # same import name as ours: put it first on the path
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [upstream, env.get("PYTHONPATH")]))
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise RuntimeError(f"{variant}/{workload} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_breakdown(variant: str, workload: str, upstream: str | None, top: int = 40) -> None:
    """Where a variant's extra Python calls per step go, against the PyTorch loop."""
    ours = measure(variant, workload, upstream=upstream or "", by_function=True)["by_function"]
    base = measure("pytorch", workload, by_function=True)["by_function"]
    print(f"{workload}: {sum(ours.values()):.0f} calls/step for {variant}, "
          f"{sum(base.values()):.0f} for pytorch; the largest differences:")  # fmt: skip
    diff = {k: ours.get(k, 0.0) - base.get(k, 0.0) for k in set(ours) | set(base)}
    for where, extra in sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:top]:
        print(f"  {extra:+8.1f}  {where}")


def available_variants(requested: list[str] | None, upstream: str | None) -> list[str]:
    variants = list(CORE_VARIANTS)
    for name, module in OPTIONAL_VARIANTS.items():
        if importlib.util.find_spec(module) is not None:
            variants.append(name)
        else:
            print(f"note: {name} is not installed; skipped (pip install -e '.[bench]')")
    if upstream:
        if not os.path.isdir(os.path.join(upstream, "accel_hydra")):
            raise SystemExit(f"--upstream {upstream}: no accel_hydra package in that directory")
        variants.append("upstream")
    else:
        print("note: upstream AccelHydra skipped (see --upstream)")
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


def paired_ratio(per_variant: dict, variant: str, base: str) -> float:
    """Median over repeats of ``variant``'s time over ``base``'s in the same repeat.

    Runs of one repeat follow each other within seconds, so a slow spell on a shared
    machine hits both sides of a ratio; pairing them cancels most of that drift.
    """
    pairs = zip(per_variant[variant]["us"], per_variant[base]["us"], strict=True)
    return statistics.median(ours / theirs for ours, theirs in pairs)


def table(results: dict, variants: list[str]) -> str:
    lines = []
    for workload, per_variant in results.items():
        lines.append(
            f"{workload} (MLP {'-'.join(map(str, WORKLOADS[workload].widths))}, "
            f"batch {WORKLOADS[workload].batch_size})"
        )
        lines.append(
            f"  {'variant':<12} {'us/step':>9} {'min..max':>15} {'vs pytorch':>10} "
            f"{'vs accelerate':>13} {'vs trainer':>10} {'calls/step':>10} {'py calls':>8}"
        )
        for variant in variants:
            row = per_variant[variant]
            spread = f"{min(row['us']):.0f}..{max(row['us']):.0f}"
            calls = row.get("calls_per_step")
            calls_text = f"{calls:.0f}" if calls is not None else "-"
            python_calls = row.get("python_calls_per_step")
            python_text = f"{python_calls:.0f}" if python_calls is not None else "-"
            vs_trainer = (
                f"{paired_ratio(per_variant, variant, 'trainer'):.3f}x"
                if "trainer" in per_variant
                else "-"
            )
            lines.append(
                f"  {variant:<12} {statistics.median(row['us']):>9.1f} {spread:>15} "
                f"{paired_ratio(per_variant, variant, 'pytorch'):>9.3f}x "
                f"{paired_ratio(per_variant, variant, 'accelerate'):>12.3f}x "
                f"{vs_trainer:>10} {calls_text:>10} {python_text:>8}"
            )
        if "trainer_all" in per_variant and "pytorch_all" in per_variant:
            ratio = paired_ratio(per_variant, "trainer_all", "pytorch_all")
            line = f"  trainer_all vs pytorch_all (the same work written by hand): {ratio:.3f}x"
            if "trainer" in per_variant:
                by_hand = paired_ratio(per_variant, "pytorch_all", "trainer")
                line += f"; pytorch_all vs trainer: {by_hand:.3f}x"
            lines.append(line)
    return "\n".join(lines)


def mixins_line(workload: str) -> str:
    """Calls per step of LoopBase with the first k of MIXIN_ORDER, k = 0..5: how the
    trainer's own per-step work grows with what is composed."""
    parts = []
    for k in range(len(MIXIN_ORDER) + 1):
        counted = measure(f"mixins{k}", workload, count_calls=True)
        parts.append(
            f"{k}: {counted['python_calls_per_step']:.0f} "
            f"({counted['own_calls_per_step']:.0f} in accel_hydra)"
        )
    return (
        f"{workload}: Python calls per step (accel_hydra's own in brackets) vs composed "
        f"mixins ({', '.join(MIXIN_ORDER)}, added in that order)\n  " + "; ".join(parts)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--workload", help=argparse.SUPPRESS)
    parser.add_argument("--count-calls", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--breakdown",
        metavar="VARIANT",
        help="instead of timing: print the Python calls per step of VARIANT by function, "
        "next to the hand-written PyTorch loop's (with --workload, default tiny)",
    )
    parser.add_argument("--workloads", default="tiny,compute", help="comma-separated")
    parser.add_argument("--variants", default=None, help="comma-separated subset")
    parser.add_argument("--repeats", type=int, default=7, help="runs per variant (>= 5)")
    parser.add_argument("--no-calls", action="store_true", help="skip the call counts")
    parser.add_argument("--json", metavar="PATH", help="also write the raw results here")
    parser.add_argument(
        "--upstream",
        metavar="DIR",
        help="also time upstream AccelHydra, installed with "
        "`pip install --no-deps --target DIR accel-hydra==0.0.6.post1` "
        "(it has our import name, so it cannot share an environment)",
    )
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args.workload, args.count_calls, args.breakdown == "-")
        print(json.dumps(result))
        return
    if args.breakdown:
        print_breakdown(args.breakdown, args.workload or "tiny", args.upstream)
        return
    if args.repeats < 5:
        parser.error("--repeats must be >= 5: a median of fewer runs is noise here")
    requested = args.variants.split(",") if args.variants else None
    variants = available_variants(requested, args.upstream)
    for needed in ("pytorch", "accelerate"):
        if needed not in variants:
            variants.insert(0, needed)
    results: dict = {}
    for workload in args.workloads.split(","):
        per_variant = {v: {"us": []} for v in variants}
        for repeat in range(args.repeats):
            shift = repeat % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                us = measure(variant, workload, upstream=args.upstream)["us_per_step"]
                per_variant[variant]["us"].append(us)
                print(f"{workload} repeat {repeat + 1}/{args.repeats} {variant:<12} {us:9.1f} us")
        if not args.no_calls:
            for variant in variants:
                counted = measure(variant, workload, count_calls=True, upstream=args.upstream)
                for key in ("calls_per_step", "python_calls_per_step"):
                    per_variant[variant][key] = counted[key]
        results[workload] = per_variant
    print()
    print(f"{time.strftime('%Y-%m-%d')}  " + "  ".join(f"{k} {v}" for k, v in versions().items()))
    print(
        f"us/step: median of {args.repeats} fresh processes per variant; ratios: median of "
        "the per-repeat ratios; torch.set_num_threads(1)"
    )
    print(table(results, variants))
    if not args.no_calls:
        for workload in results:
            print(mixins_line(workload))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"versions": versions(), "results": results}, out, indent=2)


if __name__ == "__main__":
    main()
