"""The run directory is written once, only by runs that started, and moves with the run.

A resume that fails, whatever the reason, leaves every byte of the run directory as it
was, and a plain ``--resume`` afterwards still works; a copied run directory resumes
in the copy.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal

import pytest
from accelerate.state import AcceleratorState, GradientState

from accel_hydra.cli import main
from accel_hydra.launcher import TrainLauncher
from tests.conftest import run_module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join("examples", "digits", "configs", "train.yaml")


def run(*argv: str) -> int:
    """One command, in-process, with Accelerate's process-wide state reset after it."""
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        return main(list(argv))
    finally:
        os.chdir(cwd)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def snapshot(root) -> dict[str, str]:
    """Every file below ``root`` with the hash of its bytes (the set of names included)."""
    found = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return found


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-epoch digits run (with its OneCycleLR schedule), made once."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    status = run(
        "-c", CONFIG, "-o", f"trainer.project_dir={run_dir}", "trainer.epochs=2",
        "+trainer.progress_bar=false",
    )  # fmt: skip
    assert status == 0
    return run_dir


def _bucket_overrides(s3):
    endpoint = s3.storage_options["client_kwargs"]["endpoint_url"]
    return [
        "++trainer.checkpoint_dir=s3://no-such-bucket-accel-hydra/run",
        "++trainer.storage_options={key: testing, secret: testing, client_kwargs: "
        f"{{endpoint_url: '{endpoint}'}}}}",
    ]


FAILED_RESUMES = {
    # The OneCycleLR schedule was sized for 2 epochs.
    "schedule mismatch": (["trainer.epochs=1"], "the LR schedule was sized for"),
    "shape mismatch": (["model.hidden=32"], "does not fit this model: 5 tensors differ"),
    "unbuildable object": (["model._target_=examples.digits.model.Nope"], "cannot build 'model'"),
    "unreachable bucket": (None, "bucket 'no-such-bucket-accel-hydra' does not exist"),
}


@pytest.mark.parametrize("kind", list(FAILED_RESUMES))
def test_a_failed_resume_leaves_the_run_directory_byte_identical(
    kind, finished_run, tmp_path, capsys, request
):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    overrides, message = FAILED_RESUMES[kind]
    if overrides is None:
        overrides = _bucket_overrides(request.getfixturevalue("s3"))
    before = snapshot(run_dir)
    capsys.readouterr()

    assert run("--resume", str(run_dir), "-o", *overrides) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert message in err[0]
    assert snapshot(run_dir) == before

    assert run("--resume", str(run_dir)) == 0
    assert f"resumed from {run_dir}/checkpoints/epoch_2" in capsys.readouterr().out


def test_a_copied_run_resumes_in_the_copy_and_leaves_the_original_alone(
    finished_run, tmp_path, capsys
):
    before = snapshot(finished_run)
    copy = tmp_path / "copy"
    shutil.copytree(finished_run, copy)
    capsys.readouterr()

    assert run("--resume", str(copy)) == 0
    out = capsys.readouterr().out
    assert f"resumed from {copy}/checkpoints/epoch_2" in out
    # best_checkpoint is stored relative to the checkpoint directory: it follows the copy.
    assert f"best checkpoint    {copy}/checkpoints/best" in out
    assert f"project_dir: {copy}\n" in (copy / "config.yaml").read_text()

    # Dropping the LR schedule to train on is refused (its state would be lost): the
    # checkpoint says which scheduler it holds, and nothing in either run changes.
    copied = snapshot(copy)
    assert run("--resume", str(copy), "-o", "trainer.epochs=3", "~lr_scheduler") == 2
    assert "this run has no lr_scheduler" in capsys.readouterr().err
    assert snapshot(copy) == copied
    assert snapshot(finished_run) == before


class InterruptingLauncher(TrainLauncher):
    """The digits run, sent SIGTERM by itself as its first epoch starts."""

    def build_trainer(self, config):
        trainer = super().build_trainer(config)
        trainer.on_train_epoch_start = lambda: os.kill(os.getpid(), signal.SIGTERM)
        return trainer


def test_the_interrupt_message_gives_the_command_that_resumes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        run(
            "-c", CONFIG, "--launcher", f"{__name__}.InterruptingLauncher", "-o",
            f"trainer.project_dir={run_dir}", "trainer.epochs=1", "+trainer.progress_bar=false",
        )  # fmt: skip
    assert stopped.value.code == 128 + signal.SIGTERM
    assert f"run `accel-hydra-train --resume {run_dir}`" in capsys.readouterr().err

    # The advice, followed to the letter, works.
    assert run("--resume", str(run_dir), "-o", "trainer.epochs=2") == 2  # schedule: refused
    assert run("--resume", str(run_dir)) == 0
    assert f"resumed from {run_dir}/checkpoints/step_1 " in capsys.readouterr().out


def test_a_field_the_file_leaves_out_can_be_set_without_a_plus(finished_run, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    capsys.readouterr()
    status = run(
        "-c", CONFIG, "-o", f"trainer.project_dir={run_dir}", "trainer.epochs=2",
        "trainer.resume_from_checkpoint=latest", "trainer.progress_bar=false",
    )  # fmt: skip
    assert status == 0
    assert f"resumed from {run_dir}/checkpoints/epoch_2" in capsys.readouterr().out


@pytest.mark.full_grid
def test_resume_from_another_directory_imports_the_runs_modules(finished_run, tmp_path):
    """config.yaml records where the run's modules came from; --resume puts it on
    sys.path, so the command works from any directory."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    only_the_package = tmp_path / "site"
    only_the_package.mkdir()
    os.symlink(os.path.join(REPO, "accel_hydra"), only_the_package / "accel_hydra")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run_module(
        "accel_hydra.train_entry",
        "--resume",
        run_dir,
        cwd=str(elsewhere),
        env={"PYTHONPATH": str(only_the_package)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resumed from {run_dir}/checkpoints/epoch_2" in result.stdout
