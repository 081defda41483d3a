"""SIGINT/SIGTERM become a checkpoint and a clean, non-zero exit; a second Ctrl-C aborts."""

import os
import signal
from dataclasses import dataclass

import pytest

from accel_hydra.preemption import PreemptionGuard, TrainingInterrupted
from accel_hydra.storage import CheckpointStore
from tests.conftest import ToyTrainer, trainer_kwargs


def test_guard_records_first_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.signal_number == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_second_ctrl_c_aborts_at_once():
    with PreemptionGuard() as guard, pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        assert guard.requested
        os.kill(os.getpid(), signal.SIGINT)


@dataclass(kw_only=True, eq=False)
class CtrlCAt(ToyTrainer):
    at_step: int = 5

    def training_step(self, batch, batch_idx):
        if self.step == self.at_step and batch_idx % self.gradient_accumulation_steps == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return super().training_step(batch, batch_idx)


def test_ctrl_c_finishes_the_update_saves_and_exits_130(tmp_path, capsys):
    trainer = CtrlCAt(
        **trainer_kwargs(tmp_path, epochs=3, gradient_accumulation_steps=3),
        report_to=None,
        at_step=5,
    )
    # Python's default_int_handler, or SIG_IGN when the tests run as a background job.
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as raised:
        trainer.train(seed=0)
    assert raised.value.code == 128 + signal.SIGINT
    # The signal came between two batches of update 6; the update completed first.
    assert trainer.step == 6
    store = CheckpointStore(trainer.checkpoint_dir)
    assert store.latest() == "step_6"
    assert store.read_marker("step_6")["batches_in_epoch"] == 6
    err = capsys.readouterr().err
    assert "interrupted by SIGINT at update 6 (epoch 2, batch 6)" in err
    assert signal.getsignal(signal.SIGINT) is before
