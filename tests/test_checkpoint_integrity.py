"""Damaged checkpoints, as a user meets them: a flipped byte, a full disk, a truncated
upload. Each is detected and named, the damaged checkpoint is set aside, the committed
ones stay loadable, and ``latest`` resumes the newest good one, ending bitwise equal to
an uninterrupted run.
"""

from __future__ import annotations

import math
import os
import resource
import shutil
import signal
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import torch

from accel_hydra import MetricMonitor
from accel_hydra.mixins.checkpoint import TRAINER_STATE_FILE
from accel_hydra.storage import MARKER, CheckpointCorruptError, CheckpointStore
from tests.conftest import (
    ToyTrainer,
    assert_same_parameters,
    make_model,
    parameters_of,
    trainer_kwargs,
)


def fresh_kwargs(path, **overrides):
    """Identical starting weights for every run (dropout and AdamW: RNG and moments matter)."""
    torch.manual_seed(0)
    model = make_model(dropout=0.2)
    kwargs = trainer_kwargs(
        path, model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.01)
    )
    kwargs.update(report_to=None, **overrides)
    return kwargs


def assert_same_training_state(trainer, reference):
    assert trainer.step == reference.step
    assert_same_parameters(parameters_of(trainer.model), parameters_of(reference.model))
    for a, b in zip(
        trainer.optimizer.state_dict()["state"].values(),
        reference.optimizer.state_dict()["state"].values(),
        strict=True,
    ):
        for key in a:
            assert torch.equal(a[key], b[key]), f"optimizer state {key} differs"


def flip_a_byte(path) -> None:
    """Change one byte in the middle of a file, keeping its size."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size // 2)
        byte = f.read(1)
        f.seek(size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory):
    """The uninterrupted run, 3 epochs of 12 updates."""
    trainer = ToyTrainer(**fresh_kwargs(tmp_path_factory.mktemp("reference"), epochs=3))
    trainer.train(seed=0)
    return trainer


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """Checkpoints of the same run stopped after 2 epochs: step_5..step_20, epoch_1, epoch_2."""
    root = tmp_path_factory.mktemp("two_epochs")
    trainer = ToyTrainer(**fresh_kwargs(root, epochs=2), save_every_n_steps=5, save_last_k=None)
    trainer.train(seed=0)
    return root / "checkpoints"


def test_a_flipped_byte_in_any_file_is_named(tmp_path, two_epochs):
    folder = two_epochs / "epoch_2"
    names = sorted(p.name for p in folder.iterdir() if p.name != MARKER)
    assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", TRAINER_STATE_FILE} <= set(
        names
    )
    for name in names:
        shutil.copytree(two_epochs, tmp_path / name)
        flip_a_byte(tmp_path / name / "epoch_2" / name)
        store = CheckpointStore(str(tmp_path / name))
        with pytest.raises(
            CheckpointCorruptError, match=f"epoch_2 is damaged: {name} does not"
        ) as err:
            store.fetch("epoch_2")
        assert err.value.damaged


@pytest.mark.parametrize(
    "flipped",
    [
        "model.safetensors",
        "random_states_0.pkl",
        pytest.param("optimizer.bin", marks=pytest.mark.full_grid),
        pytest.param(TRAINER_STATE_FILE, marks=pytest.mark.full_grid),
    ],
)
def test_latest_skips_a_flipped_byte_and_resumes_bitwise(
    tmp_path, capsys, two_epochs, three_epochs, flipped
):
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(two_epochs, checkpoints)
    flip_a_byte(checkpoints / "epoch_2" / flipped)

    resumed = ToyTrainer(
        **fresh_kwargs(tmp_path, epochs=3), save_every_n_steps=5, resume_from_checkpoint="latest"
    )
    resumed.train(seed=0)

    out = capsys.readouterr().out
    skipped = [line for line in out.splitlines() if "skipping epoch_2: " in line]
    assert len(skipped) == 1 and f"{flipped} does not match its checksum" in skipped[0]
    assert f"moved it aside to {checkpoints}/.corrupt-epoch_2" in skipped[0]
    assert resumed.resumed_from == "step_20"
    assert_same_training_state(resumed, three_epochs)
    assert (checkpoints / ".corrupt-epoch_2" / flipped).exists()


# -- a full disk -------------------------------------------------------------------------

#: The order in which a save writes its files (Accelerate's, then the trainer's, then ours).
WRITE_ORDER = [
    "model.safetensors",
    "optimizer.bin",
    "random_states_0.pkl",
    TRAINER_STATE_FILE,
    MARKER,
]


@contextmanager
def small_tmpfs(path, size="4m"):
    """A real tmpfs of ``size`` mounted at ``path``; skips the test where mounting fails."""
    os.makedirs(path)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


class CommitHookStore(CheckpointStore):
    """A real local store that calls ``before_commit`` first (the marker is written then)."""

    before_commit = staticmethod(lambda: None)

    def commit(self, name, staged, info):
        self.before_commit()
        super().commit(name, staged, info)


@dataclass(kw_only=True, eq=False)
class FailingWriteTrainer(ToyTrainer):
    """Epoch 2's ``best`` save fails while writing ``fail_at``: every file before it is
    written, ``fail_at`` is not.

    ``how="tmpfs"`` fills the (small tmpfs) disk so that exactly the files before
    ``fail_at`` fit: a real ENOSPC. ``how="rlimit"`` needs no mount: it lowers this
    process's RLIMIT_FSIZE just before ``fail_at`` is written, so the kernel fails that
    write with EFBIG (``SIGXFSZ`` ignored).
    """

    fail_at: str = ""
    how: str = "tmpfs"
    filler: str = ""
    # The limits are set and lifted around the save on this thread: the synchronous
    # writer (still used under FSDP and DeepSpeed) is the one these tests exercise.
    async_save: bool = False

    def __post_init__(self):
        super().__post_init__()
        self._failing = False
        store = CommitHookStore(self.checkpoint_dir)
        store.before_commit = lambda: self._limit_writes(MARKER)
        self.checkpoint_store = store

    def save_checkpoint(self, name):
        self._failing = name == "best" and self.epoch == 2
        if not self._failing:
            return super().save_checkpoint(name)
        if self.how == "tmpfs":
            self._fill_disk()
            return super().save_checkpoint(name)
        previous = resource.getrlimit(resource.RLIMIT_FSIZE)
        try:
            self._limit_writes("model.safetensors", "optimizer.bin", "random_states_0.pkl")
            return super().save_checkpoint(name)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, previous)

    def _state_to_save(self):
        self._limit_writes(TRAINER_STATE_FILE)
        return super()._state_to_save()

    def _limit_writes(self, *files):
        if self.how != "rlimit" or not self._failing or self.fail_at not in files:
            return
        sizes = self._sizes()
        earlier = WRITE_ORDER[: WRITE_ORDER.index(self.fail_at)]
        # Accelerate writes its files in one call: a limit between their sizes picks one.
        limit = sizes[self.fail_at] - 1 if len(files) > 1 else 0
        assert all(sizes[n] <= limit for n in earlier if n in files), "pick another limit"
        resource.setrlimit(
            resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1])
        )

    def _sizes(self):
        best = os.path.join(self.checkpoint_dir, "best")
        return {n: os.path.getsize(os.path.join(best, n)) for n in WRITE_ORDER}

    def _fill_disk(self):
        best = os.path.join(self.checkpoint_dir, "best")
        page = os.statvfs(best).f_frsize
        pages = {n: math.ceil(size / page) for n, size in self._sizes().items()}
        before = WRITE_ORDER[: WRITE_ORDER.index(self.fail_at)]
        room = (sum(pages[n] for n in before) + pages[self.fail_at] - 1) * page
        disk = os.statvfs(best)
        with open(self.filler, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, disk.f_bavail * disk.f_frsize - room)


FAIL_AT = [
    pytest.param("model.safetensors", marks=pytest.mark.full_grid),
    pytest.param("optimizer.bin", marks=pytest.mark.full_grid),
    "random_states_0.pkl",
    pytest.param(TRAINER_STATE_FILE, marks=pytest.mark.full_grid),
    MARKER,
]


@pytest.mark.parametrize("fail_at", FAIL_AT)
def test_a_full_disk_during_a_best_save_keeps_every_committed_checkpoint(
    tmp_path, three_epochs, fail_at
):
    disk = tmp_path / "disk"
    with small_tmpfs(disk):
        failed_save_then_resume(tmp_path, three_epochs, fail_at, "tmpfs", disk / "checkpoints")


@pytest.mark.parametrize("fail_at", FAIL_AT)
def test_a_failed_write_during_a_best_save_keeps_every_committed_checkpoint(
    tmp_path, three_epochs, fail_at
):
    """The same without a mount (any user): the write of ``fail_at`` fails with EFBIG."""
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        failed_save_then_resume(tmp_path, three_epochs, fail_at, "rlimit", tmp_path / "checkpoints")
    finally:
        signal.signal(signal.SIGXFSZ, previous)


def failed_save_then_resume(tmp_path, three_epochs, fail_at, how, checkpoints):
    checkpoints = str(checkpoints)
    # Improves at epochs 1 and 2 (two best saves), not at 3.
    scripted = [{"loss": 0.9}, {"loss": 0.5}, {"loss": 0.7}]
    common = dict(
        checkpoint_dir=checkpoints,
        metric_monitor=MetricMonitor(metric_name="loss"),
        scripted_metrics=scripted,
    )
    full = FailingWriteTrainer(
        **fresh_kwargs(tmp_path, epochs=3),
        **common,
        fail_at=fail_at,
        how=how,
        filler=os.path.join(os.path.dirname(checkpoints), "filler"),
    )
    # As each writer words it: Python and safetensors name the error, torch's does not.
    failure = (
        r"No space left on device|File too large|iostream error|unexpected pos"
        r"|was not written completely"  # torch 2.6's save does not raise: found before commit
    )
    with pytest.raises(Exception, match=failure):
        full.train(seed=0)
    stage = os.path.join(checkpoints, ".staging-best")
    # The save got as far as fail_at. (Whether later files were attempted depends on the
    # writer: torch 2.6's save does not raise, and the stage check before commit does.)
    if fail_at != MARKER:
        assert set(WRITE_ORDER[: WRITE_ORDER.index(fail_at)]) <= set(os.listdir(stage))
    store = CheckpointStore(checkpoints)
    # The best of epoch 1 and the epoch_2 checkpoint are whole, and load.
    assert store.read_marker("best")["step"] == 12
    assert store.read_marker("epoch_2")["step"] == 24
    store.verify("best")
    store.verify("epoch_2")

    if os.path.exists(full.filler):
        os.remove(full.filler)  # the user frees space and starts the run again
    again = ToyTrainer(
        **fresh_kwargs(tmp_path, epochs=3), **common, resume_from_checkpoint="latest"
    )
    again.train(seed=0)

    assert again.resumed_from == "epoch_2"
    assert_same_training_state(again, three_epochs)
    # The broken stage is gone (removed at the failed marker, or by recover() at the
    # restart), never promoted: the committed best is still the one of epoch 1.
    assert store.read_marker("best") is not None, "the stage replaced the committed best"
    assert store.read_marker("best")["step"] == 12
    store.verify("best")
    assert sorted(os.listdir(checkpoints)) == ["best", "epoch_2", "epoch_3"]


# -- object stores -----------------------------------------------------------------------


def test_a_truncated_file_on_an_object_store_is_quarantined(tmp_path, capsys, backend):
    url = backend.new_bucket() + "/run"
    common = dict(
        checkpoint_dir=url,
        storage_options=backend.storage_options,
        save_every_n_steps=4,
        save_last_k=None,
    )
    ToyTrainer(**fresh_kwargs(tmp_path, epochs=1), **common).train(seed=0)
    store = CheckpointStore(url, backend.storage_options)
    assert store.latest() == "epoch_1"
    weights = f"{store.path('epoch_1')}/model.safetensors"
    data = store.fs.cat_file(weights)
    store.fs.pipe_file(weights, data[: len(data) // 2])
    capsys.readouterr()

    resumed = ToyTrainer(
        **fresh_kwargs(tmp_path, epochs=1), **common, resume_from_checkpoint="latest"
    )
    resumed.train(seed=0)

    out = capsys.readouterr().out
    assert f"model.safetensors has {len(data) // 2} bytes, not {len(data)}" in out
    assert f"moved it aside to {url}/.corrupt-epoch_1" in out
    assert resumed.resumed_from == "step_12"
    store.fs.invalidate_cache()
    assert (
        store.fs.cat_file(f"{store.path('.corrupt-epoch_1')}/model.safetensors")
        == data[: len(data) // 2]
    )
    # The resumed run finished its epoch again: a whole epoch_1 is back in place.
    store.verify("epoch_1")
    assert store.latest() == "epoch_1"
