"""Every user mistake is one line on stderr and exit status 2, through the real command.

Each case runs the console script in a subprocess (each pays for importing torch, so
the unmarked set is a representative slice; the rest runs under ``full_grid``).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join("examples", "digits", "configs", "train.yaml")


def run_console(*args: str, cwd: str = REPO) -> subprocess.CompletedProcess:
    script = shutil.which("accel-hydra-train")
    command = [script] if script else [sys.executable, "-m", "accel_hydra.train_entry"]
    env = {**os.environ, "PYTHONPATH": REPO, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [*command, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )


def _config_with(tmp_path, old: str, new: str) -> str:
    """A copy of the digits configs whose train.yaml has ``old`` replaced by ``new``."""
    configs = tmp_path / "configs"
    shutil.copytree(os.path.join(REPO, "examples", "digits", "configs"), configs)
    text = (configs / "train.yaml").read_text()
    assert old in text
    (configs / "train.yaml").write_text(text.replace(old, new))
    return str(configs / "train.yaml")


def _finished_run(tmp_path) -> str:
    run_dir = str(tmp_path / "run")
    done = run_console(
        "-c", CONFIG, "-o", f"trainer.project_dir={run_dir}", "trainer.epochs=1",
        "+trainer.progress_bar=false",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return run_dir


# Each case: the arguments (given tmp_path), and what the one line must name.
CASES = {
    "yaml syntax": (
        lambda t: ["-c", _config_with(t, "epochs: 20", "epochs: [20")],
        ["train.yaml:", "YAML syntax error"],
    ),
    "unknown key in the file": (
        lambda t: ["-c", _config_with(t, "  epochs: 20\n", "  epochs: 20\n  epochz: 3\n")],
        ["trainer.epochz", "train.yaml line 36, column 3", "did you mean 'epochs'"],
    ),
    "empty value": (
        lambda t: ["-c", CONFIG, "-o", "trainer.epochs="],
        ["trainer.epochs", "expected an integer, got an empty value"],
    ),
    "missing target module": (
        lambda t: ["-c", CONFIG, "-o", "model._target_=wineproj.model.WineMLP"],
        ["model._target_", "ModuleNotFoundError: No module named 'wineproj'"],
    ),
    "unwritable project_dir": (
        lambda t: ["-c", CONFIG, "-o", f"trainer.project_dir={_a_file(t)}/run"],
        ["project_dir", "is not writable", "is a file, not a directory"],
    ),
}
FULL_GRID_CASES = {
    "wrong type": (
        lambda t: ["-c", CONFIG, "-o", "trainer.gradient_accumulation_steps=two"],
        ["trainer.gradient_accumulation_steps", "expected an integer, got 'two'"],
    ),
    "unknown key as an override": (
        lambda t: ["-c", CONFIG, "-o", "trainer.epochz=3"],
        ["trainer.epochz=3", "did you mean 'trainer.epochs'"],
    ),
    "unwritable checkpoint_dir": (
        lambda t: [
            "-c",
            CONFIG,
            "-o",
            f"trainer.project_dir={t}/run",
            f"+trainer.checkpoint_dir={_a_file(t)}/ckpt",
        ],  # fmt: skip
        ["checkpoint_dir", "is not writable"],
    ),
    "wrong metric_name": (
        lambda t: [
            "-c",
            CONFIG,
            "-o",
            f"trainer.project_dir={t}/run",
            "trainer.metric_monitor.metric_name=acc",
        ],  # fmt: skip
        ["metric_monitor.metric_name", "'acc'", "['accuracy', 'loss']"],
    ),
    "shape mismatch": (
        lambda t: ["--resume", _finished_run(t), "-o", "model.hidden=32"],
        ["does not fit this model: 5 tensors differ in shape", "and 2 more"],
    ),
}


def _a_file(tmp_path) -> str:
    path = tmp_path / "a_file"
    path.write_text("not a directory")
    return str(path)


@pytest.mark.parametrize(
    "case",
    [*CASES, *(pytest.param(c, marks=pytest.mark.full_grid) for c in FULL_GRID_CASES)],
)
def test_each_mistake_is_one_line_and_exit_status_2(case, tmp_path):
    make_args, names = {**CASES, **FULL_GRID_CASES}[case]
    result = run_console(*make_args(tmp_path))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1, lines
    assert lines[0].startswith("accel-hydra-train: error: ")
    for name in names:
        assert name in lines[0]
    assert "accel_hydra: starting" not in result.stdout  # no training batch ran
