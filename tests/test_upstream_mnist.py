"""Upstream AccelHydra's MNIST example, ported as docs/migrating.rst says, trains as well.

The port (``tests/upstream_mnist``) keeps upstream's model, trainer and config, with
the data swapped for scikit-learn's digits upsampled to 28x28 and the config changes
the migration guide lists. Upstream reached 0.90 validation accuracy on this data;
this package, with the guide's changes, must reach at least 0.88.

Ten epochs of a 3.3M-parameter convolutional network take minutes on a CPU, so the
test runs in the full grid only.
"""

from __future__ import annotations

import os
import re

import pytest

from tests.conftest import run_module

PORT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "upstream_mnist")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.full_grid
def test_the_ported_mnist_example_reaches_upstreams_accuracy(tmp_path):
    pytest.importorskip("sklearn")
    done = run_module(
        "accel_hydra.train_entry",
        "-c",
        "configs/train.yaml",
        "-o",
        f"exp_dir={tmp_path}",
        "train_dataloader.num_workers=0",  # data in memory: worker processes only cost here
        "+trainer.progress_bar=false",
        cwd=PORT,
        env={"PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])},
        timeout=3600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    best = float(re.search(r"best accuracy\s+([\d.]+)", done.stdout).group(1))
    print(f"ported upstream MNIST example: best validation accuracy {best:.4f} (upstream: 0.90)")
    assert best >= 0.88, done.stdout[-2000:]
