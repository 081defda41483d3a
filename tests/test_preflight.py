"""Pre-flight: mistakes that used to surface after an epoch fail before the first batch,
and the sanity validation changes nothing an exact resume depends on."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from accel_hydra import MetricMonitor
from accel_hydra.preflight import PreflightError
from tests.conftest import (
    ToyTrainer,
    assert_same_parameters,
    parameters_of,
    trainer_kwargs,
)


@dataclass(kw_only=True, eq=False)
class CountingTrainer(ToyTrainer):
    """Records every training batch, to prove none ran before an error."""

    batches: list = field(default_factory=list)

    def training_step(self, batch, batch_idx):
        self.batches.append(batch_idx)
        return super().training_step(batch, batch_idx)


def test_an_unwritable_checkpoint_dir_fails_before_the_first_batch(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    trainer = CountingTrainer(**trainer_kwargs(tmp_path, checkpoint_dir=f"{blocker}/ckpt"))
    with pytest.raises(PreflightError, match=r"checkpoint_dir .*a_file/ckpt is not writable"):
        trainer.train(seed=0)
    assert trainer.batches == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing was written


def test_a_wrong_metric_name_fails_before_the_first_batch_naming_the_keys(tmp_path, capsys):
    trainer = CountingTrainer(
        **trainer_kwargs(tmp_path, metric_monitor=MetricMonitor(metric_name="acc"))
    )
    with pytest.raises(KeyError, match=r"'acc' not in get_val_metrics\(\) keys \['loss'\]"):
        trainer.train(seed=0)
    assert trainer.batches == []
    assert "accel_hydra: starting" not in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # no logs, no checkpoints


def test_sanity_validation_changes_nothing_the_run_depends_on(tmp_path):
    """Dropout draws from the RNG: a run with the sanity pass ends bitwise equal to one
    without it."""
    finals = []
    for batches in (0, 2):
        torch.manual_seed(0)  # the same initial weights
        kwargs = trainer_kwargs(tmp_path / str(batches), sanity_val_batches=batches)
        kwargs["model"][2].p = 0.2  # the toy model's Dropout
        trainer = ToyTrainer(**kwargs)
        trainer.train(seed=0)
        finals.append(parameters_of(trainer.model))
    assert_same_parameters(*finals)


def test_sanity_val_batches_must_not_be_negative(tmp_path):
    with pytest.raises(ValueError, match="sanity_val_batches must be >= 0"):
        ToyTrainer(**trainer_kwargs(tmp_path, sanity_val_batches=-1))
