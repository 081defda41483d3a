"""The start summary: the mixed precision in use and the model's table of modules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from accel_hydra.model_summary import module_table
from tests.conftest import ToyTrainer, trainer_kwargs


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Linear(4, 16)  # 80 parameters, frozen below
        self.head = nn.Linear(16, 1)  # 17 parameters
        self.scale = nn.Parameter(torch.ones(1))  # held by the model itself

    def forward(self, x):
        return self.head(torch.relu(self.backbone(x))) * self.scale


def frozen_backbone():
    model = Encoder()
    model.backbone.requires_grad_(False)
    return model


def test_the_table_counts_trainable_and_frozen_parameters_per_top_level_module():
    rows = [row.split() for row in module_table(frozen_backbone())]
    assert rows == [
        ["module", "type", "trainable", "frozen"],
        ["backbone", "Linear", "0", "80"],
        ["head", "Linear", "17", "0"],
        ["(own)", "Encoder", "1", "0"],
        ["total", "18", "80"],
    ]


def test_a_long_model_stays_short():
    model = nn.Sequential(*[nn.Linear(10, 10) for _ in range(50)])
    rows = module_table(model, max_rows=5)
    assert len(rows) == 1 + 5 + 1
    assert rows[-2].split() == ["...", "46", "more", "5,060", "0"]
    assert rows[-1].split() == ["total", "5,500", "0"]


def start_summary(tmp_path, capsys, **overrides):
    model = frozen_backbone()
    kwargs = trainer_kwargs(tmp_path, epochs=1, model=model, report_to=None)
    kwargs.update(optimizer=torch.optim.SGD(model.head.parameters(), lr=0.05), **overrides)
    ToyTrainer(**kwargs).train(seed=0)
    out = capsys.readouterr().out
    return out[out.index("accel_hydra: starting") :].split("accel_hydra: done")[0]


def test_the_start_summary_shows_the_model_table_and_the_mixed_precision(tmp_path, capsys):
    summary = start_summary(tmp_path, capsys, mixed_precision="bf16")
    lines = [line.split() for line in summary.splitlines()]
    assert ["mixed", "precision", "bf16"] in lines
    assert ["model", "module", "type", "trainable", "frozen"] in lines
    assert ["backbone", "Linear", "0", "80"] in lines
    assert ["total", "18", "80"] in lines


def test_model_summary_false_leaves_the_table_out(tmp_path, capsys):
    summary = start_summary(tmp_path, capsys, model_summary=False)
    assert "backbone" not in summary and "trainable" in summary  # the parameters line


def test_mixed_precision_reaches_the_accelerator(tmp_path):
    trainer = ToyTrainer(**trainer_kwargs(tmp_path, epochs=1), mixed_precision="bf16")
    trainer.train(seed=0)
    assert trainer.accelerator.mixed_precision == "bf16"


def test_mixed_precision_set_twice_differently_is_one_line(tmp_path):
    with pytest.raises(ValueError) as raised:
        ToyTrainer(
            **trainer_kwargs(tmp_path),
            mixed_precision="bf16",
            accelerator_kwargs={"mixed_precision": "fp16"},
        )
    message = str(raised.value)
    assert "mixed_precision='bf16'" in message and "'fp16'" in message
    assert "\n" not in message


def test_an_unknown_mixed_precision_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mixed_precision must be 'no', 'bf16', 'fp16'"):
        ToyTrainer(**trainer_kwargs(tmp_path), mixed_precision="fp32")
