"""Asynchronous checkpoint saves (``async_save``): killed at each phase, in order, exact.

The kill tests run ``tests/resume_harness.py`` in a subprocess paused by the test hook
``ACCEL_HYDRA_PAUSE_SAVE`` at one phase of the background save of ``step_18``, then
killed with SIGKILL: the previous checkpoint must be ``latest`` and the resume must end
bitwise equal to the uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import pytest
import torch

from accel_hydra.host_snapshot import PAUSE_SAVE_ENV, HostBuffers
from accel_hydra.storage import CheckpointStore
from tests.conftest import ToyTrainer, make_loader, make_model
from tests.test_resume import assert_bitwise_equal, harness

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    done = harness(root, root / "result.pt")
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "result.pt"


def run_paused_then_kill(project, phase, name):
    """Start the harness, wait until its save of ``name`` pauses at ``phase``, SIGKILL it."""
    flag = project / "paused_in_save"
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "true",
        "PYTHONPATH": REPO,
        PAUSE_SAVE_ENV: f"{phase}@{name}",
        "ACCEL_HYDRA_PAUSE_SAVE_FILE": str(flag),
    }
    command = [sys.executable, "-m", "tests.resume_harness", "--project", str(project)]
    process = subprocess.Popen(
        [*command, "--result", str(project / "unused.pt")],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 180
        while not flag.exists():
            assert process.poll() is None, process.communicate()[1].decode()[-3000:]
            assert time.monotonic() < deadline, "the save never reached the pause"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.communicate()
    return process.returncode


def kill_at_phase_then_resume(tmp_path, uninterrupted, phase):
    returncode = run_paused_then_kill(tmp_path, phase, "step_18")
    assert returncode == -signal.SIGKILL
    assert CheckpointStore(str(tmp_path / "checkpoints")).latest() == "step_15"
    resumed = harness(tmp_path, tmp_path / "result.pt", "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_15" in resumed.stdout
    assert_bitwise_equal(tmp_path / "result.pt", uninterrupted)


def test_kill_while_the_background_save_writes_files_leaves_the_previous_checkpoint(
    tmp_path, uninterrupted
):
    kill_at_phase_then_resume(tmp_path, uninterrupted, "serialization")


@pytest.mark.full_grid
@pytest.mark.parametrize("phase", ["snapshot", "marker"])
def test_kill_at_each_phase_of_a_background_save(tmp_path, uninterrupted, phase):
    kill_at_phase_then_resume(tmp_path, uninterrupted, phase)


class SlowRecordingStore(CheckpointStore):
    """A real local store whose commits take a while and are recorded with their times."""

    def commit(self, name, staged, info, callback=None):
        start = time.monotonic()
        time.sleep(0.2)
        super().commit(name, staged, info, callback)
        self.commits.append((name, start, time.monotonic()))


@dataclass(kw_only=True, eq=False)
class RecordingTrainer(ToyTrainer):
    def save_checkpoint(self, name):
        saved = super().save_checkpoint(name)
        self.returned.append((name, time.monotonic()))
        return saved


def toy_trainer(project, cls=ToyTrainer, **kwargs):
    torch.manual_seed(0)
    model = make_model()
    settings = {"epochs": 1, "progress_bar": False, "report_to": None, **kwargs}
    return cls(
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=0.01),
        train_dataloader=make_loader(n=48),
        project_dir=str(project),
        **settings,
    )


def test_a_save_asked_for_while_one_is_in_flight_waits_and_both_commit_in_order(tmp_path):
    trainer = toy_trainer(tmp_path, RecordingTrainer, save_every_n_steps=2, save_last_k=None)
    trainer.checkpoint_store = SlowRecordingStore(trainer.checkpoint_dir)
    trainer.checkpoint_store.commits = []
    trainer.returned = []
    trainer.train(seed=0)
    commits = trainer.checkpoint_store.commits
    assert [name for name, _, _ in commits] == ["step_2", "step_4", "step_6", "epoch_1"]
    for (_, _, end), (_, start, _) in zip(commits, commits[1:], strict=False):
        assert end <= start, "two saves were in flight at once"
    # Training went on while a commit ran: the save returned before its commit ended.
    returned = dict(trainer.returned)
    assert any(returned[name] < end for name, _, end in commits)
    assert sorted(CheckpointStore(trainer.checkpoint_dir).committed()) == [
        "epoch_1",
        "step_2",
        "step_4",
        "step_6",
    ]


def test_an_asynchronous_checkpoint_is_byte_for_byte_the_synchronous_one(tmp_path):
    dirs = {}
    for async_save in (True, False):
        project = tmp_path / f"async_{async_save}"
        trainer = toy_trainer(project, async_save=async_save)
        trainer.train(seed=0)
        dirs[async_save] = project / "checkpoints" / "epoch_1"
        lines = dict(trainer._summary_lines())
        assert lines["checkpoint saves"].startswith(
            "in the background" if async_save else "synchronous"
        )
    names = sorted(os.listdir(dirs[True]))
    assert names == sorted(os.listdir(dirs[False]))
    assert "model.safetensors" in names and "optimizer.bin" in names
    for name in names:
        assert (dirs[True] / name).read_bytes() == (dirs[False] / name).read_bytes(), name
    # And it resumes: the trainer state and weights load into a fresh trainer.
    fresh = toy_trainer(tmp_path / "fresh", resume_from_checkpoint=str(dirs[True]), epochs=2)
    fresh.train(seed=0)
    assert fresh.resumed_from is None and fresh.step == 12


def test_host_buffers_are_reused_between_saves_and_keep_tied_tensors_tied():
    weight = torch.randn(4, 4)
    state = {"a": weight, "b": weight.detach(), "step": 3}
    buffers = HostBuffers()
    buffers.start()
    first = buffers.copy(state)
    assert first["a"] is first["b"] and torch.equal(first["a"], weight)
    weight.add_(1.0)  # training moves on; the snapshot does not
    assert not torch.equal(first["a"], weight)
    buffers.start()
    second = buffers.copy(state)
    assert second["a"].data_ptr() == first["a"].data_ptr()  # the same host memory
    assert torch.equal(second["a"], weight) and buffers.nbytes == weight.nbytes


def test_the_first_background_save_finds_its_host_buffers_allocated_beside_training(
    tmp_path, monkeypatch
):
    """Fresh host memory costs a page fault per 4 KiB: the first save would pay several
    copies' worth on the training thread. It is allocated on a thread of its own after
    the first update (slowed here, so the save must wait for it), and the checkpoint
    is still the synchronous one, byte for byte."""
    allocated_on = []
    allocate = HostBuffers._allocate_spec

    def recording_allocate(shape, dtype, pinned):
        allocated_on.append(threading.current_thread().name)
        time.sleep(0.02)
        return allocate(shape, dtype, pinned)

    monkeypatch.setattr(HostBuffers, "_allocate_spec", staticmethod(recording_allocate))
    trainer = toy_trainer(tmp_path / "async", save_every_n_steps=2, save_last_k=None)
    trainer.train(seed=0)
    assert allocated_on and set(allocated_on) == {"accel_hydra host buffers"}
    monkeypatch.undo()
    reference = toy_trainer(
        tmp_path / "sync", save_every_n_steps=2, save_last_k=None, async_save=False
    )
    reference.train(seed=0)
    for name in ("step_2", "epoch_1"):
        for path in (tmp_path / "sync" / "checkpoints" / name).iterdir():
            written = tmp_path / "async" / "checkpoints" / name / path.name
            assert written.read_bytes() == path.read_bytes(), f"{name}/{path.name}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_state_is_copied_into_pinned_buffers_without_a_host_sync(tmp_path):
    from accelerate import Accelerator

    from accel_hydra.host_snapshot import take_snapshot, write_snapshot

    accelerator = Accelerator()
    model = accelerator.prepare(torch.nn.Linear(64, 64).cuda())
    before = model.weight.detach().cpu()
    buffers = HostBuffers()
    snapshot = take_snapshot(accelerator, buffers, [], None)
    assert snapshot.ready is not None
    host = snapshot.files["model.safetensors"][1]
    assert all(t.is_pinned() for t in host.values())
    with torch.no_grad():
        model.weight.add_(1.0)  # queued after the copies: the snapshot keeps the old weights
    write_snapshot(snapshot, str(tmp_path))
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(saved["weight"], before)
