"""LoopBase: the order of work, update counting, epochs, and no per-step device sync."""

import os
import sys
from dataclasses import dataclass, field

import pytest
import torch

from accel_hydra import LoopBase
from tests.conftest import ToySteps, make_loader, trainer_kwargs


@dataclass(kw_only=True, eq=False)
class RecordingLoop(ToySteps, LoopBase):
    calls: list = field(default_factory=list)

    def training_step(self, batch, batch_idx):
        self.calls.append("training_step")
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.calls.append("validation_step")
        super().validation_step(batch, batch_idx)

    def get_val_metrics(self):
        self.calls.append("get_val_metrics")
        return super().get_val_metrics()


for _hook in (
    "on_train_start",
    "on_train_end",
    "on_train_epoch_start",
    "on_train_epoch_end",
    "on_validation_start",
    "on_validation_end",
):

    def _recorder(self, _name=_hook):
        self.calls.append(_name)
        base = getattr(ToySteps, _name, None)
        if base is not None:
            base(self)

    setattr(RecordingLoop, _hook, _recorder)


def collapse(calls):
    """Runs of the same call as (name, count)."""
    out = []
    for call in calls:
        if out and out[-1][0] == call:
            out[-1] = (call, out[-1][1] + 1)
        else:
            out.append((call, 1))
    return out


def test_hooks_run_in_the_documented_order(tmp_path):
    loop = RecordingLoop(
        **trainer_kwargs(
            tmp_path,
            train_dataloader=make_loader(n=32, batch_size=8),
            val_dataloader=make_loader(n=16, batch_size=8, shuffle=False),
        )
    )
    loop.train(seed=0)
    epoch = [
        ("on_train_epoch_start", 1),
        ("training_step", 4),
        ("on_validation_start", 1),
        ("validation_step", 2),
        ("on_validation_end", 1),
        ("get_val_metrics", 1),
        ("on_train_epoch_end", 1),
    ]
    sanity = epoch[2:6]  # sanity_val_batches=2: a short validation before anything else
    assert collapse(loop.calls) == [
        *sanity,
        ("on_train_start", 1),
        *epoch,
        *epoch,
        ("on_train_end", 1),
    ]
    assert (loop.epoch, loop.step) == (2, 8)


def test_training_step_is_abstract(tmp_path):
    @dataclass(kw_only=True)
    class NoSteps(LoopBase):
        pass

    with pytest.raises(TypeError, match="abstract"):
        NoSteps(**trainer_kwargs(tmp_path))


@pytest.mark.parametrize(
    ("batches", "accumulation", "updates"), [(12, 1, 12), (12, 3, 4), (10, 3, 4)]
)
def test_step_counts_optimizer_updates(tmp_path, batches, accumulation, updates):
    loop = RecordingLoop(
        **trainer_kwargs(
            tmp_path,
            train_dataloader=make_loader(n=8 * batches, batch_size=8),
            gradient_accumulation_steps=accumulation,
            epochs=2,
        )
    )
    optimizer_steps = []
    loop.on_train_start = lambda: loop.optimizer.optimizer.register_step_post_hook(
        lambda *_: optimizer_steps.append(loop.step)
    )
    loop.train(seed=0)
    assert loop.updates_per_epoch == updates
    assert loop.step == 2 * updates
    assert len(optimizer_steps) == 2 * updates


def test_epoch_length_cuts_epochs_and_flushes_partial_accumulation(tmp_path):
    loop = RecordingLoop(
        **trainer_kwargs(tmp_path, epoch_length=5, gradient_accumulation_steps=2, epochs=3)
    )
    loop.train(seed=0)
    assert loop.calls.count("training_step") == 15
    assert loop.step == 3 * 3  # ceil(5 / 2) updates per epoch


def test_epoch_length_longer_than_loader_is_an_error(tmp_path):
    loop = RecordingLoop(**trainer_kwargs(tmp_path, epoch_length=1000))
    with pytest.raises(ValueError, match="epoch_length=1000 exceeds the 12 batches"):
        loop.train(seed=0)


def test_setting_should_stop_training_ends_the_run(tmp_path):
    loop = RecordingLoop(**trainer_kwargs(tmp_path, epochs=5, sanity_val_batches=0))

    def stop_after_third_batch(batch, batch_idx, original=loop.training_step):
        if loop.step == 3:
            loop.should_stop_training = True
        return original(batch, batch_idx)

    loop.training_step = stop_after_third_batch
    loop.train(seed=0)
    assert loop.step == 4
    assert loop.epoch == 0
    assert "validation_step" not in loop.calls
    assert loop.calls[-1] == "on_train_end"


def test_same_seed_same_parameters(tmp_path):
    results = []
    for run in range(2):
        torch.manual_seed(0)
        loop = RecordingLoop(**trainer_kwargs(tmp_path / str(run)))
        torch.manual_seed(run)  # must not matter: train(seed) reseeds shuffling and dropout
        loop.train(seed=3)
        results.append(loop.model.state_dict())
    for key in results[0]:
        assert torch.equal(results[0][key], results[1][key])


def test_loss_is_read_only_on_logging_steps(tmp_path, monkeypatch):
    """Counting the loop's host reads of tensors: a 24-update run without logging reads
    the loss once per epoch (the epoch-end check), not once per batch."""
    reads = []
    original = torch.Tensor.item

    def counting_item(self):
        caller = sys._getframe(1).f_code.co_filename
        if f"accel_hydra{os.sep}" in caller:
            reads.append(caller)
        return original(self)

    loop = RecordingLoop(**trainer_kwargs(tmp_path, val_dataloader=None))
    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    loop.train(seed=0)
    monkeypatch.undo()
    assert loop.step == 24
    assert len(reads) == 2


def test_train_twice_is_refused_with_a_clear_error(tmp_path):
    trainer = RecordingLoop(**trainer_kwargs(tmp_path, epochs=1))
    trainer.train(seed=0)
    with pytest.raises(RuntimeError, match=r"train\(\) was already called on this RecordingLoop"):
        trainer.train(seed=0)
    assert trainer.step == 12  # nothing ran a second time


@dataclass(kw_only=True, eq=False)
class FailingRun(ToySteps, LoopBase):
    """A user bug at update 3, then a clean-up that fails as an upload would."""

    def training_step(self, batch, batch_idx):
        if self.step == 3:
            raise ValueError("bad batch in the user's training_step")
        return super().training_step(batch, batch_idx)

    def _after_train(self):
        super()._after_train()
        raise OSError("upload of s3://bucket/run/step_3 failed")


def test_a_failing_clean_up_never_replaces_the_users_exception(tmp_path, capsys):
    trainer = FailingRun(**trainer_kwargs(tmp_path, epochs=1))
    with pytest.raises(ValueError, match="bad batch") as raised:
        trainer.train(seed=0)
    note = "the clean-up failed too: OSError: upload of s3://bucket/run/step_3 failed"
    assert note in capsys.readouterr().err
    if sys.version_info >= (3, 11):
        assert any(note in line for line in raised.value.__notes__)
