"""The console script on the digits example, and its one-line errors."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from accel_hydra.cli import main
from tests.conftest import run_module

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


@pytest.mark.single_env
def test_digits_example_reaches_95_percent(tmp_path):
    result = run_cli(tmp_path, "-c", CONFIG, "-o", f"trainer.project_dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    accuracies = [float(a) for a in re.findall(r"validation: accuracy=([0-9.]+)", result.stdout)]
    assert accuracies and max(accuracies) >= 0.95
    assert "best checkpoint" in result.stdout
    assert os.path.exists(tmp_path / "checkpoints" / "best" / "model.safetensors")
    assert os.listdir(tmp_path / "logs")


def test_module_entry_with_overrides(tmp_path):
    result = run_module(
        "accel_hydra.train_entry",
        "-c",
        CONFIG,
        "-o",
        f"trainer.project_dir={tmp_path}",
        "trainer.epochs=2",
        "+trainer.save_every_n_steps=5",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epochs completed   2" in result.stdout
    assert os.path.isdir(tmp_path / "checkpoints" / "step_45")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["-o", "trainer.epoch=3"],
            "-o trainer.epoch=3: examples.digits.trainer.DigitsTrainer has no parameter "
            "'epoch' (config examples/digits/configs/train.yaml); did you mean 'trainer.epochs'?",
        ),
        (
            ["-o", "model._target_=examples.digits.model.Nope"],
            "cannot build 'model' from examples/digits/configs/train.yaml: Error locating "
            "target 'examples.digits.model.Nope' (module 'examples.digits.model' has no "
            "attribute 'Nope'); check model._target_",
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


def test_multirun_runs_each_combination_into_its_own_directory(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(REPO)
    status = main(
        [
            "-c",
            CONFIG,
            "-m",
            "-o",
            f"trainer.project_dir={tmp_path}",
            "trainer.epochs=1",
            "optimizer.lr=1e-3,1e-2",
            "+trainer.progress_bar=false",
        ]
    )
    assert status == 0
    out = capsys.readouterr().out
    assert "job 1/2: trainer.project_dir=" in out and "optimizer.lr=0.001" in out
    assert "job 2/2" in out and "optimizer.lr=0.01" in out
    saved = [(tmp_path / "multirun" / str(i) / "config.yaml").read_text() for i in (0, 1)]
    assert "lr: 0.001" in saved[0] and "lr: 0.01" in saved[1]
    for i in (0, 1):
        assert (tmp_path / "multirun" / str(i) / "checkpoints" / "epoch_1").is_dir()


def test_config_is_saved_redacted_and_resume_continues_the_run(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(REPO)
    # No OneCycleLR here: its length is fixed when the run starts (see docs/checkpoints).
    common = ["+trainer.progress_bar=false", "~lr_scheduler"]
    assert (
        main(["-c", CONFIG, "-o", f"trainer.project_dir={tmp_path}", "trainer.epochs=2", *common])
        == 0
    )
    saved = (tmp_path / "config.yaml").read_text()
    assert f"project_dir: {tmp_path}" in saved and "epochs: 2" in saved
    capsys.readouterr()

    # Resume with more epochs: continues from epoch 2, trains epoch 3 only.
    assert main(["--resume", str(tmp_path), "-o", "trainer.epochs=3"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "epoch_2" in out
    assert "epoch 3/3 validation" in out and "epoch 1/3 validation" not in out


def test_secrets_in_storage_options_never_reach_the_saved_config(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("FAKE_SECRET", "from-the-environment")
    status = main(
        [
            "-c",
            CONFIG,
            "-o",
            f"trainer.project_dir={tmp_path}",
            "trainer.epochs=1",
            "+trainer.progress_bar=false",
            "+trainer.storage_options={auto_mkdir: true, password: hunter2, "
            "token: '${oc.env:FAKE_SECRET}'}",
        ]
    )
    assert status == 0
    saved = (tmp_path / "config.yaml").read_text()
    assert "hunter2" not in saved and "password: '***'" in saved
    assert "token: ${oc.env:FAKE_SECRET}" in saved
    assert "from-the-environment" not in saved


def test_resume_of_a_directory_without_config(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(REPO)
    assert main(["--resume", str(tmp_path)]) == 2
    assert f"--resume {tmp_path}: no config.yaml there" in capsys.readouterr().err


def _run_tree(root) -> dict:
    """Every entry below ``root`` with its size and modification time."""
    found = {}
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            info = os.stat(os.path.join(parent, name))
            found[os.path.relpath(os.path.join(parent, name), root)] = (
                info.st_size,
                info.st_mtime_ns,
            )
    return found


def _saved_val_metrics(checkpoint) -> dict:
    with open(checkpoint / "accel_hydra_trainer_state.json") as f:
        return json.load(f)["val_metrics"]


def test_validate_prints_a_checkpoints_metrics_and_writes_nothing(monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(REPO)
    train = ["-c", CONFIG, "-o", f"trainer.project_dir={tmp_path}", "trainer.epochs=2"]
    assert main([*train, "+trainer.progress_bar=false", "~lr_scheduler"]) == 0
    config_bytes = (tmp_path / "config.yaml").read_bytes()
    before = _run_tree(tmp_path)
    capsys.readouterr()

    # Default: best. One "name: value" line per metric, the exact saved floats.
    assert main(["--resume", str(tmp_path), "--validate"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    printed = {name: float(value) for name, value in (line.split(": ") for line in lines)}
    assert printed == _saved_val_metrics(tmp_path / "checkpoints" / "best")

    assert main(["--resume", str(tmp_path), "--validate", "epoch_1", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == _saved_val_metrics(tmp_path / "checkpoints" / "epoch_1")

    assert main(["--resume", str(tmp_path), "--validate", "step_999"]) == 2
    err = capsys.readouterr().err
    assert "--validate step_999: checkpoint" in err and "epoch_1, best, epoch_2" in err
    assert len(err.strip().splitlines()) == 1

    # Nothing in the run directory changed: config.yaml, checkpoints, logs, no lock.
    assert (tmp_path / "config.yaml").read_bytes() == config_bytes
    assert _run_tree(tmp_path) == before


def test_validate_needs_resume(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["-c", CONFIG, "--validate"]) == 2
    assert "--validate needs --resume RUN_DIR" in capsys.readouterr().err
