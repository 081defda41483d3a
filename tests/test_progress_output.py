"""Honest progress: throughput over training time only, plain lines when piped, and
each scalar logged once per update."""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

import pytest

from tests.conftest import ToyTrainer, make_loader, trainer_kwargs

BATCH_SECONDS = 0.02


@dataclass(kw_only=True, eq=False)
class PacedTrainer(ToyTrainer):
    """Training batches take BATCH_SECONDS; each validation takes far longer."""

    def training_step(self, batch, batch_idx):
        time.sleep(BATCH_SECONDS)
        return super().training_step(batch, batch_idx)

    def on_validation_end(self):
        time.sleep(0.5)

    def log(self, values, step=None):
        self.logged.append(dict(values))
        super().log(values, step)


def test_samples_per_second_ignores_a_slow_validation(tmp_path):
    # 12 batches of 8 per epoch, a log every 5 updates: windows span the validations.
    trainer = PacedTrainer(**trainer_kwargs(tmp_path, epochs=3, log_every_n_steps=5))
    trainer.logged = []
    trainer.train(seed=0)
    rates = [v["train/samples_per_sec"] for v in trainer.logged if "train/samples_per_sec" in v]
    assert len(rates) >= 6
    training_only = 8 / BATCH_SECONDS  # the most a batch of 8 every BATCH_SECONDS allows
    for rate in rates:
        assert training_only / 2 <= rate <= training_only * 1.05, rates


def test_piped_progress_is_one_plain_line_per_epoch(tmp_path, capsys):
    trainer = ToyTrainer(**trainer_kwargs(tmp_path, epochs=2, progress_bar=True))
    trainer.train(seed=0)
    err = capsys.readouterr().err  # not a terminal
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert [line.split(" batches")[0] for line in lines] == ["epoch 1/2 12/12", "epoch 2/2 12/12"]
    assert all("loss=" in line and "lr=" in line and "samples/s=" in line for line in lines)
    assert "run eta=" in lines[0]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "accelerate"])
def test_each_scalar_is_logged_once_per_update_with_accumulation(tmp_path, direct):
    @dataclass(kw_only=True, eq=False)
    class Recording(ToyTrainer):
        _allow_direct_updates = direct

        def log(self, values, step=None):
            for key, value in values.items():
                if value is not None:
                    seen[(key, self.step if step is None else step)] += 1
            super().log(values, step)

    seen: collections.Counter = collections.Counter()
    trainer = Recording(
        **trainer_kwargs(
            tmp_path,
            train_dataloader=make_loader(n=128, batch_size=8),
            gradient_accumulation_steps=4,
            log_every_n_steps=1,
        )
    )
    trainer.train(seed=0)
    assert trainer.step == 8
    assert {key for key, _ in seen} >= {"train/loss", "train/lr", "train/samples_per_sec"}
    assert max(seen.values()) == 1, {k: n for k, n in seen.items() if n > 1}
    assert sum(1 for key, _ in seen if key == "train/lr") == 8
