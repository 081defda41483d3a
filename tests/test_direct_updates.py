"""The direct update path (torch called without Accelerate's per-step wrappers) trains
exactly like the Accelerate path, and is only taken where that is provably so."""

from dataclasses import dataclass, field

import pytest
import torch
from accelerate.utils import GradientAccumulationPlugin
from torch import nn
from torch.utils.data import DataLoader

from tests.conftest import (
    FixedOrderStream,
    ToyTrainer,
    assert_bitwise_equal,
    make_loader,
    regression_data,
    trainer_kwargs,
)


@dataclass(kw_only=True, eq=False)
class ObservedTrainer(ToyTrainer):
    """Records what a user's code can see of the accumulation state, batch by batch."""

    seen: list = field(default_factory=list)

    def training_step(self, batch, batch_idx):
        gas = self.gradient_accumulation_steps
        self.seen.append((self.accelerator.sync_gradients, self.accelerator.step % gas))
        return super().training_step(batch, batch_idx)

    def on_train_epoch_end(self):
        self.seen.append(("epoch end", self.accelerator.step % self.gradient_accumulation_steps))


@dataclass(kw_only=True, eq=False)
class AcceleratedTrainer(ObservedTrainer):
    _allow_direct_updates = False


def run(cls, tmp_path, **overrides):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, fused=overrides.pop("fused", None))
    kwargs = trainer_kwargs(
        tmp_path,
        model=model,
        optimizer=optimizer,
        lr_scheduler=torch.optim.lr_scheduler.LinearLR(optimizer, 1.0, 0.1, total_iters=40),
        train_dataloader=make_loader(n=96, batch_size=8),
        epochs=3,
        log_every_n_steps=2,
        report_to=None,
    )
    kwargs.update(overrides)
    trainer = cls(**kwargs)
    trainer.train(seed=0)
    return trainer


def final_state(trainer):
    optimizer = trainer.optimizer.optimizer.state_dict()
    return {
        "params": {k: v.clone() for k, v in trainer.model.state_dict().items()},
        "optimizer": optimizer["state"],
        "lr": [group["lr"] for group in optimizer["param_groups"]],
        "step": trainer.step,
        "epoch": trainer.epoch,
        "loss": trainer.last_loss,
        "grad_norm": trainer.last_grad_norm,
        "seen": trainer.seen,
    }


@pytest.mark.parametrize(
    "settings",
    [
        dict(max_grad_norm=0.5),
        dict(gradient_accumulation_steps=3, max_grad_norm=0.5),
        # 12 batches per epoch cut to 7: the epoch ends inside an accumulation cycle.
        dict(gradient_accumulation_steps=3, epoch_length=7, clip_grad_value=0.05),
        dict(gradient_accumulation_steps=5, max_grad_norm=0.1, clip_grad_value=0.05),
        # A stream without len() (12 batches) ends each epoch before epoch_length: its
        # last batch must still complete the update, on both paths.
        dict(
            gradient_accumulation_steps=5,
            epoch_length=14,
            train_dataloader=DataLoader(FixedOrderStream(regression_data(96)), batch_size=8),
        ),
    ],
    ids=["clip-norm", "accumulate-3", "truncated-epoch", "accumulate-5-both-clips", "stream"],
)
def test_direct_updates_train_bitwise_like_accelerate(tmp_path, settings):
    direct = run(ObservedTrainer, tmp_path / "direct", **settings)
    accelerated = run(AcceleratedTrainer, tmp_path / "accelerated", **settings)
    assert direct.direct_updates and not accelerated.direct_updates
    assert direct.step > 0
    assert_bitwise_equal(final_state(direct), final_state(accelerated))


def test_nan_guard_skips_the_update_on_the_direct_path_too(tmp_path):
    @dataclass(kw_only=True, eq=False)
    class NaNAtBatch5(ObservedTrainer):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * float("nan") if batch_idx == 5 else loss

    @dataclass(kw_only=True, eq=False)
    class NaNAtBatch5Accelerated(NaNAtBatch5):
        _allow_direct_updates = False

    # A fused optimizer skips the bad update on the device: update 3 (batches 4 and 5)
    # and update 4 leave the parameters as update 2 left them; the read at update 4
    # (a logging step) stops the run on both paths.
    direct = run(NaNAtBatch5, tmp_path / "d", gradient_accumulation_steps=2, fused=True)
    accelerated = run(
        NaNAtBatch5Accelerated, tmp_path / "a", gradient_accumulation_steps=2, fused=True
    )
    assert direct.step == accelerated.step == 4
    assert direct.nonfinite_loss_step == accelerated.nonfinite_loss_step == 3
    assert all(torch.isfinite(p).all() for p in direct.model.parameters())
    assert_bitwise_equal(final_state(direct)["params"], final_state(accelerated)["params"])


def test_resume_crosses_paths(tmp_path):
    """A checkpoint written on the direct path resumes on Accelerate's path (and back)
    to the same end as an uninterrupted run."""
    settings = dict(gradient_accumulation_steps=3, save_every_n_steps=1, max_grad_norm=0.5)

    @dataclass(kw_only=True, eq=False)
    class StopMidEpoch2(ObservedTrainer):
        def _after_update(self):
            super()._after_update()
            if self.step == 6:  # batch 6 of 12 in the second epoch
                self.should_stop_training = True

    full = run(ObservedTrainer, tmp_path / "full", **settings)
    for second in (AcceleratedTrainer, ObservedTrainer):
        project = tmp_path / second.__name__
        run(StopMidEpoch2, project, **settings)
        resumed = run(second, project, resume_from_checkpoint="latest", **settings)
        assert_bitwise_equal(final_state(resumed)["params"], final_state(full)["params"])
        assert_bitwise_equal(final_state(resumed)["optimizer"], final_state(full)["optimizer"])


@pytest.mark.parametrize(
    "accelerator_kwargs",
    [
        dict(mixed_precision="bf16"),
        dict(
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=1, sync_each_batch=True
            )
        ),
    ],
    ids=["bf16", "sync-each-batch"],
)
def test_accelerate_keeps_the_step_where_it_does_more(tmp_path, accelerator_kwargs):
    trainer = run(
        ObservedTrainer,
        tmp_path,
        accelerator_kwargs=accelerator_kwargs,
        epochs=1,
    )
    assert not trainer.direct_updates
    assert trainer.step == 12
