"""CheckpointMixin with a remote ``checkpoint_dir``: background uploads, retention, logs.

Stores are real: moto's S3 server, and fsspec's memory filesystem with a subclass that
holds each upload until training has moved on.
"""

from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass
from typing import ClassVar

import pytest
from fsspec.implementations.memory import MemoryFileSystem

from accel_hydra import MetricMonitor
from accel_hydra.mixins.checkpoint import TRAINER_STATE_FILE
from accel_hydra.preflight import PreflightError
from accel_hydra.storage import CheckpointStore
from accel_hydra.uploader import CheckpointUploadError
from tests.conftest import ToyTrainer, trainer_kwargs


class HeldUploadFileSystem(MemoryFileSystem):
    """A memory filesystem whose first upload waits until training reaches ``release_at``.

    If the upload blocked training, the trainer would never get there: the wait times
    out and ``released`` stays False.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.release = threading.Event()
        self.released: bool | None = None
        self.steps_while_uploading: list[int] = []

    def put_file(self, lpath, rpath, **kwargs):
        if self.released is None:
            self.released = self.release.wait(timeout=30)
        super().put_file(lpath, rpath, **kwargs)


@dataclass(kw_only=True, eq=False)
class WatchedTrainer(ToyTrainer):
    """Records each update taken while an upload is in flight; releases a held upload."""

    release_at: int = 0
    upload_retry_delays: ClassVar[tuple[float, ...]] = (0.01, 0.01)

    def _after_update(self):
        fs = self.checkpoint_store.fs
        if self._uploader.in_flight and isinstance(fs, HeldUploadFileSystem):
            fs.steps_while_uploading.append(self.step)
            if self.step >= self.release_at:
                fs.release.set()
        super()._after_update()


def test_training_continues_while_a_checkpoint_uploads(tmp_path):
    trainer = WatchedTrainer(
        **trainer_kwargs(tmp_path),
        checkpoint_dir=f"memory://held-{uuid.uuid4().hex}/run",
        save_every_n_steps=4,
        save_last_k=None,
        release_at=7,
    )
    fs = HeldUploadFileSystem(skip_instance_cache=True)
    trainer.checkpoint_store.fs = fs

    trainer.train(seed=0)

    assert fs.released, "the upload of step_4 was never released: training waited for it"
    assert fs.steps_while_uploading[:3] == [5, 6, 7]
    # train() returned only after the last upload was committed.
    assert set(trainer.checkpoint_store.committed()) >= {"step_24", "epoch_2", "step_4"}


@dataclass(kw_only=True, eq=False)
class BucketDroppingTrainer(WatchedTrainer):
    """Deletes its bucket after the first update: every upload is then refused."""

    def _after_update(self):
        if self.step == 1:
            self.checkpoint_store.fs.rm(self.checkpoint_store.root.split("/")[0], recursive=True)
        super()._after_update()


@pytest.mark.parametrize("async_upload, stopped_at", [(True, 8), (False, 4)])
def test_refused_upload_names_the_url_and_keeps_the_stage(tmp_path, s3, async_upload, stopped_at):
    url = s3.new_bucket() + "/run"
    trainer = BucketDroppingTrainer(
        **trainer_kwargs(tmp_path),
        checkpoint_dir=url,
        storage_options=s3.storage_options,
        save_every_n_steps=4,
        async_upload=async_upload,
    )
    trainer._check_writable = lambda: None  # the missing bucket is for the upload to meet
    with pytest.raises(CheckpointUploadError, match=f"checkpoint {url}/step_4 failed 3 time") as e:
        trainer.train(seed=0)
    stage = trainer.checkpoint_store.staging_dir("step_4")
    try:
        assert f"kept in {stage}" in str(e.value)
        assert os.path.exists(os.path.join(stage, TRAINER_STATE_FILE))
        # In the background the failure surfaces at the next save; else at this one.
        assert trainer.step == stopped_at
    finally:
        trainer.checkpoint_store.clear_staging("step_4")
        trainer.checkpoint_store.clear_staging("step_8")


def test_retention_deletes_only_this_runs_rotating_checkpoints(tmp_path, s3):
    bucket = s3.new_bucket()
    fs = s3.filesystem()
    # Someone else's objects beside and under the run: none of them may go.
    for url in (f"{bucket}/run2/step_1", f"{bucket}/run-old/step_1", f"{bucket}/run/step_1"):
        CheckpointStore(url.rsplit("/", 1)[0], s3.storage_options).commit(
            "step_1", _stage(tmp_path / uuid.uuid4().hex), {"step": 1, "epoch": 0}
        )
    CheckpointStore(f"{bucket}/run", s3.storage_options).commit(
        "permanent_step_1", _stage(tmp_path / uuid.uuid4().hex), {"step": 1, "epoch": 0}
    )
    fs.pipe(f"{bucket}/run/notes.txt".split("://")[1], b"keep me")
    trainer = ToyTrainer(
        **trainer_kwargs(
            tmp_path, config_dict={"trainer": {"storage_options": s3.storage_options}}
        ),
        checkpoint_dir=f"{bucket}/run",
        log_dir=f"{bucket}/logs",
        storage_options=s3.storage_options,
        save_every_n_steps=5,
        save_last_k=2,
        metric_monitor=MetricMonitor(metric_name="loss"),
    )
    trainer.train(seed=0)

    run = CheckpointStore(f"{bucket}/run", s3.storage_options)
    # step_1 of this run is older than the two kept: rotated away like the others.
    assert set(run.committed()) == {"step_20", "epoch_2", "best", "permanent_step_1"}
    assert CheckpointStore(f"{bucket}/run2", s3.storage_options).latest() == "step_1"
    assert CheckpointStore(f"{bucket}/run-old", s3.storage_options).latest() == "step_1"
    assert fs.cat(f"{bucket}/run/notes.txt".split("://")[1]) == b"keep me"
    events = fs.glob(f"{bucket}/logs/events.out.tfevents.*".split("://")[1])
    assert events and fs.size(events[0]) > 0


def test_resumed_from_checkpoint_survives_retention(tmp_path, s3):
    url = s3.new_bucket() + "/run"
    options = s3.storage_options
    first = ToyTrainer(
        **trainer_kwargs(tmp_path, epochs=1),
        checkpoint_dir=url,
        storage_options=options,
        save_every_n_steps=3,
        save_last_k=None,
    )
    first.train(seed=0)
    resumed = ToyTrainer(
        **trainer_kwargs(tmp_path / "again", epochs=2),
        checkpoint_dir=url,
        storage_options=options,
        save_every_n_steps=3,
        save_last_k=1,
        resume_from_checkpoint="step_6",
    )
    resumed.train(seed=0)
    assert resumed.resumed_from == "step_6"
    assert set(CheckpointStore(url, options).committed()) == {"step_6", "epoch_2"}


def test_credentials_never_reach_the_console_or_the_logs(tmp_path, capsys):
    options = {"key": "AKIAEXAMPLEKEY", "secret": "s3cr3t-value", "client_kwargs": {}}
    trainer = ToyTrainer(
        **trainer_kwargs(tmp_path, epochs=1, config_dict={"trainer": {"storage_options": options}}),
        checkpoint_dir=f"memory://creds-{uuid.uuid4().hex}/run",
        storage_options=options,
    )
    trainer.train(seed=0)
    printed = capsys.readouterr()
    assert "storage options" in printed.out
    logged = b"".join(path.read_bytes() for path in (tmp_path / "logs").iterdir())
    assert b"client_kwargs" in logged
    for secret in ("AKIAEXAMPLEKEY", "s3cr3t-value"):
        assert secret not in printed.out + printed.err
        assert secret.encode() not in logged


def _stage(path) -> str:
    os.makedirs(path)
    with open(os.path.join(path, "model.bin"), "w") as f:
        f.write("someone else's weights")
    return str(path)


def test_missing_bucket_stops_the_run_before_training(tmp_path, s3, capsys):
    url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/run"
    trainer = ToyTrainer(
        **trainer_kwargs(tmp_path),
        checkpoint_dir=url,
        storage_options=s3.storage_options,
        resume_from_checkpoint="latest",
    )
    # Found by the pre-flight, before anything is built or written.
    with pytest.raises(PreflightError) as err:
        trainer.train(seed=0)
    assert str(err.value).startswith(f"checkpoint_dir {url}: bucket 'no-such-bucket-")
    assert trainer.step == 0
    assert "starting fresh" not in capsys.readouterr().out
