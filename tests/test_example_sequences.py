"""examples/sequences trains from its YAML through the console script."""

from __future__ import annotations

import os
import re

from accel_hydra.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sequence_example_learns_from_bucketed_padded_batches(tmp_path, capsys):
    config = os.path.join(REPO, "examples", "sequences", "configs", "train.yaml")
    overrides = [
        f"trainer.project_dir={tmp_path}",
        "trainer.epochs=2",
        "train_dataloader.size=600",
        "+trainer.progress_bar=false",
    ]
    assert main(["-c", config, "-o", *overrides]) == 0
    out = capsys.readouterr().out
    assert float(re.search(r"best accuracy\s+([\d.]+)", out).group(1)) >= 0.9
