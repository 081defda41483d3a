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
import re
import signal
import subprocess
import sys

import pytest

from accel_hydra.storage import CheckpointStore
from tests.conftest import run_module
from tests.storage_servers import free_port
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


# S3 runs in every torch env; the same protocol on GCS and Azure (fsspec, not torch) in one.
@pytest.mark.parametrize(
    "backend",
    [
        "s3",
        pytest.param("gcs", marks=pytest.mark.single_env),
        pytest.param("azure", marks=pytest.mark.single_env),
    ],
    indirect=True,
)
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


@pytest.mark.single_env
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


@pytest.mark.single_env
def test_two_processes_and_two_machines_save_to_s3_and_resume_bitwise(tmp_path, s3):
    """2 real processes (gloo), first on one machine, then as if on two.

    The reference run is one machine (torchrun): the main process uploads the shared
    stage in the background. The killed and the resumed runs pose as two machines,
    each process with its own temp dir (its own "local disk"): each must upload what
    it staged itself, or the checkpoint lacks rank 1's random state and resume fails.
    The machines are told apart from Accelerate's state alone: no LOCAL_WORLD_SIZE.
    """
    options = json.dumps(s3.storage_options)
    common = ["-m", "tests.resume_harness", "--project", str(tmp_path), "--epochs", "2",
              "--storage-options", options]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_WORLD_SIZE"}
    env.update(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")

    def one_machine(url, result):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   *common, "--checkpoint-dir", url, "--result", str(result)]  # fmt: skip
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env,
                              timeout=300)  # fmt: skip

    def two_machines(url, result, *args):
        port = str(free_port())
        processes = []
        for rank in (0, 1):
            disk = tmp_path / f"machine{rank}_{port}"
            disk.mkdir()
            machine = {"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                       "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": port, "TMPDIR": str(disk)}  # fmt: skip
            command = [sys.executable, *common, "--checkpoint-dir", url,
                       "--result", f"{result}.{rank}", *map(str, args)]  # fmt: skip
            processes.append(subprocess.Popen(
                command, cwd=REPO, env={**env, **machine}, text=True,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            ))  # fmt: skip
        outputs = [process.communicate(timeout=300) for process in processes]
        return [process.returncode for process in processes], outputs[0]

    bucket = s3.new_bucket()
    reference = one_machine(f"{bucket}/reference", tmp_path / "reference.pt")
    assert reference.returncode == 0, reference.stderr[-3000:]
    codes, _ = two_machines(f"{bucket}/run", tmp_path / "unused.pt", "--kill",
                            "after_checkpoint", "--at", 9)  # fmt: skip
    assert codes == [-signal.SIGKILL, -signal.SIGKILL]
    store = CheckpointStore(f"{bucket}/run", s3.storage_options)
    # Uploads on several machines are synchronous: step_9 was committed before the kill.
    assert store.latest() == "step_9"
    assert "random_states_1.pkl" in store.read_marker("step_9")["files"]

    codes, (stdout, stderr) = two_machines(f"{bucket}/run", tmp_path / "result.pt", "--resume",
                                           "latest")  # fmt: skip

    assert codes == [0, 0], stderr[-3000:]
    assert f"resumed from {bucket}/run/step_9" in stdout
    assert_bitwise_equal(tmp_path / "reference.pt", f"{tmp_path / 'result.pt'}.0")


@pytest.fixture
def stoppable_s3(tmp_path):
    """A moto server for one test alone, which the test may freeze with SIGSTOP."""
    from tests.storage_servers import moto_command, s3_backend, start_server

    port = free_port()
    server = start_server("s3", moto_command(port), port, str(tmp_path))
    try:
        yield server, s3_backend(port)
    finally:
        if server.process.poll() is None:
            os.kill(server.process.pid, signal.SIGCONT)
        server.stop()


def stalled_harness(tmp_path, server, backend, url, *args):
    """A run whose S3 server is stopped just before it saves ``step_6``.

    ``storage_timeout=1`` and one retry after 0.2 s make the stall show within seconds;
    stages go under ``tmp_path`` (``TMPDIR``) so the test can find and resume them.
    """
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    return run_module(
        "tests.resume_harness",
        "--project",
        tmp_path,
        "--result",
        tmp_path / "unused.pt",
        "--checkpoint-dir",
        url,
        "--storage-options",
        json.dumps(backend.storage_options),
        "--storage-timeout",
        1,
        "--retry-delays",
        "0.2",
        "--stop-pid",
        server.process.pid,
        "--stop-at",
        6,
        *args,
        env={"ACCELERATE_USE_CPU": "true", "TMPDIR": str(tmp)},
        timeout=120,
    )


def kept_stage(stderr: str) -> str:
    match = re.search(r"resume_from_checkpoint=(\S+?);", stderr)
    assert match, stderr[-3000:]
    return match.group(1)


@pytest.mark.single_env
def test_stalled_endpoint_fails_the_upload_and_its_kept_stage_resumes(
    tmp_path, stoppable_s3, reference
):
    server, s3 = stoppable_s3
    url = s3.new_bucket() + "/run"

    stalled = stalled_harness(tmp_path, server, s3, url)

    assert stalled.returncode == 1, stalled.stderr[-3000:]
    last = stalled.stderr.strip().splitlines()[-1]
    assert f"CheckpointUploadError: upload of checkpoint {url}/step_6 failed 2 time(s)" in last
    stage = kept_stage(last)
    assert f"kept in {stage}" in last and stage.endswith("step_6")
    os.kill(server.process.pid, signal.SIGCONT)
    # Nothing committed was lost; the stalled checkpoint never counted.
    store = CheckpointStore(url, s3.storage_options)
    assert store.latest() == "step_3"
    store.fetch("step_3")

    resumed = remote_harness(tmp_path, s3, url, tmp_path / "result.pt", "--resume", stage)

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {stage} (epoch 0, step 6" in resumed.stdout
    # The killed run could not remove its lease from the frozen server: taken over.
    assert f"took over the lease of {url}" in resumed.stderr
    assert_bitwise_equal(reference, tmp_path / "result.pt")


@pytest.mark.single_env
def test_sigterm_while_waiting_for_a_stalled_upload_exits_143_naming_url_and_stage(
    tmp_path, stoppable_s3
):
    server, s3 = stoppable_s3
    url = s3.new_bucket() + "/run"

    stopped = stalled_harness(tmp_path, server, s3, url, "--kill", "sigterm_after_stop")

    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    said = [line for line in stopped.stderr.splitlines() if "interrupted by SIGTERM" in line]
    assert len(said) == 1, stopped.stderr[-3000:]
    assert f"upload of checkpoint {url}/step_6 did not finish" in said[0]
    stage = kept_stage(said[0])
    # The kept stage is a whole checkpoint: marker written, every file it lists there.
    parent, name = os.path.split(stage)
    assert CheckpointStore(parent).fetch(name) == stage
