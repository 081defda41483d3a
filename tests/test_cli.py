"""The console script on the digits example, and its one-line errors."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from accel_hydra.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join("examples", "digits", "configs", "train.yaml")


def run_cli(tmp_path, *args, env=None):
    script = shutil.which("accel-hydra-train")
    command = [script] if script else [sys.executable, "-m", "accel_hydra.train_entry"]
    return subprocess.run(
        [*command, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
        timeout=300,
    )


def test_digits_example_reaches_95_percent(tmp_path):
    result = run_cli(tmp_path, "-c", CONFIG, "-o", f"trainer.project_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    accuracies = [float(a) for a in re.findall(r"validation: accuracy=([0-9.]+)", result.stdout)]
    assert accuracies and max(accuracies) >= 0.95
    assert "best checkpoint" in result.stdout
    assert os.path.exists(tmp_path / "checkpoints" / "best" / "model.safetensors")
    assert os.listdir(tmp_path / "logs")


def test_module_entry_with_overrides(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "accel_hydra.train_entry",
            "-c",
            CONFIG,
            "-o",
            f"trainer.project_dir={tmp_path}",
            "trainer.epochs=2",
            "+trainer.save_every_n_steps=5",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epochs completed   2" in result.stdout
    assert os.path.isdir(tmp_path / "checkpoints" / "step_45")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["-o", "trainer.epoch=3"],
            "Could not override 'trainer.epoch'. To append to your config use "
            "+trainer.epoch=3 (config examples/digits/configs/train.yaml",
        ),
        (
            ["-o", "model._target_=examples.digits.model.Nope"],
            "cannot build 'model' from examples/digits/configs/train.yaml: Error locating "
            "target 'examples.digits.model.Nope'; check model._target_",
        ),
        (
            ["-o", "~trainer.epochs"],
            "argument: 'epochs'\"); set trainer.epochs in the file, or add it with "
            "+trainer.epochs=VALUE",
        ),
        (["-o", "trainer.epochs"], "Error parsing override 'trainer.epochs'"),
        (
            ["--launcher", "accel_hydra.launcher.Nope"],
            "--launcher accel_hydra.launcher.Nope: cannot",
        ),
        (["-m", "-o", "a=[1"], "cannot expand the sweep"),
    ],
)
def test_bad_config_gives_one_line_error(monkeypatch, capsys, args, message):
    monkeypatch.chdir(REPO)
    assert main(["-c", CONFIG, *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert message in lines[0]


def test_missing_config_file(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["-c", "no/such.yaml"]) == 2
    assert "config file no/such.yaml not found" in capsys.readouterr().err
