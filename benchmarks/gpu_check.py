"""What only a CUDA machine can check, in one go (under 5 minutes on one GPU).

1. **No sync between logging steps.** A bf16 run of the digits MLP and one of a ~1 GB
   stack of linear layers, each with ``torch.cuda.set_sync_debug_mode("error")``
   around the timed updates (no logging step, checkpoint or epoch end inside them):
   any host-device synchronization the default loop issued there (the NaN guard
   included) raises. The data lives on the GPU, so fetching a batch copies nothing.
2. **Async save stall at 1 GB.** The training stall of one checkpoint save of the
   1 GB model with ``async_save`` on and off (``CheckpointMixin.async_save``; printed
   as ``skipped: no async_save`` where the field does not exist).
3. **Bitwise resume.** The digits MLP trained 2 epochs in one go, and 1 epoch then
   resumed from its checkpoint for the second: the parameters must be equal bitwise.

Run from the repository root: ``python benchmarks/gpu_check.py`` (``--size-gb 0.25`` for
a smaller GPU). Without CUDA it says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def digits_on_gpu(device: torch.device) -> torch.utils.data.TensorDataset:
    """The digits images (scikit-learn's, or random 8x8 ones without it), on ``device``."""
    try:
        from examples.digits.data import digits_dataset

        data = digits_dataset("train")
        x, y = data.tensors
    except ImportError:
        generator = torch.Generator().manual_seed(0)
        x = torch.rand(1437, 64, generator=generator)
        y = torch.randint(0, 10, (1437,), generator=generator)
    return torch.utils.data.TensorDataset(x.to(device), y.to(device))


def linear_stack(size_gb: float, width: int = 4096) -> torch.nn.Module:
    """Linear layers of ``width`` squared fp32 weights, about ``size_gb`` in all."""
    layers = max(1, round(size_gb * 2**30 / (width * width * 4)))
    blocks: list[torch.nn.Module] = []
    for _ in range(layers):
        blocks += [torch.nn.Linear(width, width), torch.nn.GELU()]
    return torch.nn.Sequential(*blocks[:-1])


def make_trainer_class():
    import torch.nn.functional as F

    from accel_hydra import Trainer

    @dataclasses.dataclass(kw_only=True, eq=False)
    class CheckTrainer(Trainer):
        regression: bool = False
        #: The updates (inclusive, exclusive) run under set_sync_debug_mode("error").
        checked: tuple[int, int] = (0, 0)
        timings: dict = dataclasses.field(default_factory=dict)

        def training_step(self, batch, batch_idx):
            x, y = batch
            out = self.model(x)
            if self.regression:
                return F.mse_loss(out.float(), x.float())
            return F.cross_entropy(out, y)

        def validation_step(self, batch, batch_idx):
            pass

        def _after_update(self):
            super()._after_update()
            first, end = self.checked
            if self.step == first:
                torch.cuda.synchronize()
                self.timings["start"] = time.perf_counter()
                torch.cuda.set_sync_debug_mode("error")
            elif self.step == end:
                torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize()
                updates = end - first
                elapsed = time.perf_counter() - self.timings["start"]
                self.timings["ms_per_update"] = elapsed / updates * 1e3

    return CheckTrainer


def trainer_for(cls, model, dataset, project_dir, batch_size, epochs, **fields):
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True)
    defaults = dict(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
        train_dataloader=loader,
        epochs=epochs,
        project_dir=project_dir,
        accelerator_kwargs={"mixed_precision": "bf16"},
        progress_bar=False,
        report_to=None,
        log_every_n_steps=10**6,
        save_every_n_epochs=None,
        max_grad_norm=1.0,
        sanity_val_batches=0,
    )
    defaults.update(fields)
    return cls(**defaults)


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def check_no_sync(cls, name, model, dataset, batch_size, updates, root, **fields) -> str:
    # Updates 2..updates+2 of one epoch: the first warms up, the epoch's end is later.
    epoch_length = updates + 4
    trainer = trainer_for(
        cls,
        model,
        dataset,
        os.path.join(root, name),
        batch_size,
        epochs=1,
        epoch_length=epoch_length,
        checked=(2, 2 + updates),
        **fields,
    )
    trainer.train(seed=0)
    reset_accelerate()
    ms = trainer.timings["ms_per_update"]
    return (
        f"{name}: {updates} bf16 updates with sync debug mode 'error': passed, {ms:.2f} ms/update"
    )


def save_stall(cls, dataset, size_gb, root, async_save: bool) -> float:
    """Seconds one save of the ~size_gb model holds up the training loop."""
    model = linear_stack(size_gb)
    trainer = trainer_for(
        cls, model, dataset, os.path.join(root, f"save_{async_save}"), 64, epochs=1,
        epoch_length=3, regression=True, async_save=async_save, save_every_n_steps=2,
    )  # fmt: skip
    stalls = []
    original = trainer.save_checkpoint

    def timed_save(name):
        torch.cuda.synchronize()
        start = time.perf_counter()
        saved = original(name)
        stalls.append(time.perf_counter() - start)
        return saved

    trainer.save_checkpoint = timed_save
    trainer.train(seed=0)  # waits for a background save before returning
    reset_accelerate()
    return stalls[0]


def resume_is_bitwise(cls, root) -> bool:
    from examples.digits.model import DigitsMLP

    dataset = digits_on_gpu(torch.device("cuda"))

    def run(name, epochs, resume=None):
        torch.manual_seed(0)
        trainer = trainer_for(
            cls, DigitsMLP(hidden=128, dropout=0.1), dataset, os.path.join(root, name), 64,
            epochs=epochs, save_every_n_epochs=1, resume_from_checkpoint=resume,
        )  # fmt: skip
        trainer.train(seed=0)
        reset_accelerate()
        return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}

    whole = run("whole", 2)
    run("split", 1)
    resumed = run("split", 2, resume="latest")
    return whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=1.0, help="the large model's size")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing checked (run it on a machine with a GPU)")
        return 0
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    from accel_hydra.mixins import CheckpointMixin
    from examples.digits.model import DigitsMLP

    cls = make_trainer_class()
    device = torch.device("cuda")
    print(f"gpu_check: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    failures = 0
    with tempfile.TemporaryDirectory() as root:
        digits = digits_on_gpu(device)
        big_inputs = torch.utils.data.TensorDataset(
            torch.randn(64 * 16, 4096, device=device), torch.zeros(64 * 16, device=device)
        )
        checks = [
            ("digits MLP", lambda: DigitsMLP(hidden=128, dropout=0.1), digits, 64, 15, {}),
            (f"{args.size_gb:g} GB linear stack", lambda: linear_stack(args.size_gb),
             big_inputs, 64, 6, {"regression": True}),
        ]  # fmt: skip
        for name, build, dataset, batch_size, updates, fields in checks:
            try:
                print(
                    check_no_sync(cls, name, build(), dataset, batch_size, updates, root, **fields)
                )
            except RuntimeError as error:
                torch.cuda.set_sync_debug_mode("default")
                failures += 1
                print(f"{name}: FAILED, a synchronizing call between logging steps: {error}")
            torch.cuda.empty_cache()
        if "async_save" not in {f.name for f in dataclasses.fields(CheckpointMixin)}:
            print(f"save stall at {args.size_gb:g} GB: skipped: no async_save")
        else:
            sync = save_stall(cls, big_inputs, args.size_gb, root, async_save=False)
            background = save_stall(cls, big_inputs, args.size_gb, root, async_save=True)
            print(
                f"save stall at {args.size_gb:g} GB: async {background:.2f} s, synchronous "
                f"{sync:.2f} s ({background / sync:.2f}x)"
            )
        torch.cuda.empty_cache()
        same = resume_is_bitwise(cls, root)
        failures += not same
        print(f"resume: 1 epoch + resumed 1 epoch vs 2 epochs bitwise equal: {same}")
    print("gpu_check: " + ("all passed" if not failures else f"{failures} FAILED"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
