"""Kill a real training process that saves to S3, GCS or Azure; resume from ``latest``.

The store is a real protocol server (moto, gcp-storage-emulator, azurite) started by the
``backend`` fixture. Uploads run in the background, so a SIGKILL right after a save
usually lands while that checkpoint is still uploading: ``latest`` must then pick the
previous committed one, and the resumed run must still end bitwise equal to an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from accel_hydra.storage import CheckpointStore
from tests.test_resume import REPO, assert_bitwise_equal, harness


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote_reference")
    done = harness(root, root / "result.pt")
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "result.pt"


def remote_harness(tmp_path, backend, url, result, *args):
    options = json.dumps(backend.storage_options)
    return harness(tmp_path, result, "--checkpoint-dir", url, "--storage-options", options, *args)


def test_sigkill_after_save_then_resume_latest_is_bitwise_equal(tmp_path, backend, reference):
    url = backend.new_bucket() + "/run"
    killed = remote_harness(
        tmp_path, backend, url, tmp_path / "unused.pt", "--kill", "after_checkpoint", "--at", 6
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    store = CheckpointStore(url, backend.storage_options)
    assert store.latest() in {"step_3", "step_6"}
    # A newer checkpoint whose upload never finished: files, no marker.
    store.fs.pipe(f"{store.path('step_9')}/model.safetensors", b"half an upload")

    resumed = remote_harness(tmp_path, backend, url, tmp_path / "result.pt", "--resume", "latest")

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from " + url + "/step_" in resumed.stdout
    assert "step_9" not in resumed.stdout.split("resumed from", 1)[1].splitlines()[0]
    assert_bitwise_equal(reference, tmp_path / "result.pt")


def test_sigterm_flushes_the_upload_before_exiting(tmp_path, s3, reference):
    url = s3.new_bucket() + "/run"
    stopped = remote_harness(
        tmp_path, s3, url, tmp_path / "unused.pt", "--kill", "sigterm", "--at", 4
    )
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    store = CheckpointStore(url, s3.storage_options)
    # Update 5 is no regular save: the preemption saved it, and uploaded it before exiting.
    assert store.latest() == "step_5"

    resumed = remote_harness(tmp_path, s3, url, tmp_path / "result.pt", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_bitwise_equal(reference, tmp_path / "result.pt")


def test_two_processes_save_to_s3_and_resume_bitwise(tmp_path, s3):
    """2 real processes (gloo): every one stages, the main one uploads and commits."""

    def launch(url, result, *args):
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "-m", "tests.resume_harness", "--project", str(tmp_path), "--result", str(result),
            "--epochs", "2", "--checkpoint-dir", url,
            "--storage-options", json.dumps(s3.storage_options), *map(str, args),
        ]  # fmt: skip
        env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env,
                              timeout=300)  # fmt: skip

    bucket = s3.new_bucket()
    reference = launch(f"{bucket}/reference", tmp_path / "reference.pt")
    assert reference.returncode == 0, reference.stderr[-3000:]
    killed = launch(f"{bucket}/run", tmp_path / "unused.pt", "--kill", "after_checkpoint",
                    "--at", 9)  # fmt: skip
    assert killed.returncode != 0
    assert CheckpointStore(f"{bucket}/run", s3.storage_options).latest() is not None

    resumed = launch(f"{bucket}/run", tmp_path / "result.pt", "--resume", "latest")

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert_bitwise_equal(tmp_path / "reference.pt", tmp_path / "result.pt")
