"""Logs are as exact as checkpoints: a run SIGKILLed at update 31 after a checkpoint at
20, then resumed, reads back in TensorBoard with every ``train/loss`` step exactly once
and the values of the uninterrupted run."""

from __future__ import annotations

import json
import signal

import fsspec
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import run_module


def log_run(project, log_dir, *args, options=None):
    extra = ["--storage-options", json.dumps(options)] if options else []
    return run_module(
        "tests.log_harness", "--project", project, "--log-dir", log_dir, *extra, *args
    )


def losses(log_dir):
    """Every ``train/loss`` event TensorBoard shows, as ``(step, value)`` in file order."""
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted_logs")
    done = log_run(root, root / "logs")
    assert done.returncode == 0, done.stderr[-3000:]
    return losses(root / "logs")


def kill_at_31_then_resume(project, log_dir, options=None):
    killed = log_run(project, log_dir, "--kill-at", 31, options=options)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = log_run(project, log_dir, "--resume", "latest", options=options)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_20" in resumed.stdout


def assert_exact(seen, uninterrupted):
    steps = [step for step, _ in seen]
    assert sorted(steps) == list(range(1, 37)), f"steps logged {steps}"
    assert sorted(seen) == uninterrupted


def test_killed_and_resumed_run_logs_every_step_once_with_uninterrupted_values(
    tmp_path, uninterrupted
):
    assert [step for step, _ in uninterrupted] == list(range(1, 37))
    kill_at_31_then_resume(tmp_path, tmp_path / "logs")
    assert_exact(losses(tmp_path / "logs"), uninterrupted)


@pytest.mark.full_grid
def test_a_remote_log_dir_is_exact_too(tmp_path, s3, uninterrupted):
    url = s3.new_bucket() + "/logs"
    kill_at_31_then_resume(tmp_path, url, options=s3.storage_options)
    fs, root = fsspec.core.url_to_fs(url, **s3.storage_options)
    fs.get(root + "/", str(tmp_path / "copy") + "/", recursive=True)
    assert_exact(losses(tmp_path / "copy"), uninterrupted)
