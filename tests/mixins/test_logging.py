import importlib.util
import os
import uuid
from dataclasses import dataclass, field

import fsspec
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from accel_hydra import GradClipMixin, LoggingMixin
from accel_hydra.trackers import TRACKERS
from tests.conftest import ToyTrainer, compose, trainer_kwargs

Logged = compose(GradClipMixin, LoggingMixin)


@dataclass(kw_only=True, eq=False)
class UserLogging(Logged):
    def on_train_epoch_end(self):
        self.accelerator.log({"user/epoch_marker": float(self.epoch)}, step=self.step)


def read_events(log_dir):
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return events


def test_scalars_land_in_event_files(tmp_path):
    trainer = UserLogging(
        **trainer_kwargs(tmp_path, config_dict={"optimizer": {"lr": 0.05}}),
        log_every_n_steps=5,
        max_grad_norm=10.0,
    )
    trainer.train(seed=0)
    events = read_events(tmp_path / "logs")
    scalars = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "train/grad_norm",
        "train/samples_per_sec",
        "val/loss",
        "user/epoch_marker",
    } <= scalars
    assert [e.step for e in events.Scalars("train/loss")] == [5, 10, 15, 20]
    assert [e.value for e in events.Scalars("train/lr")] == pytest.approx([0.05] * 4)
    assert [e.step for e in events.Scalars("val/loss")] == [12, 24]
    assert [e.value for e in events.Scalars("user/epoch_marker")] == [1.0, 2.0]
    assert "config/text_summary" in events.Tags()["tensors"]


def test_self_log_writes_user_scalars(tmp_path):
    trainer = Logged(**trainer_kwargs(tmp_path, epochs=1))
    trainer.on_train_end = lambda: trainer.log({"custom/value": 3.5}, step=7)
    trainer.train(seed=0)
    events = read_events(tmp_path / "logs")
    assert [(e.step, e.value) for e in events.Scalars("custom/value")] == [(7, 3.5)]


def test_report_to_none_writes_nothing(tmp_path):
    trainer = Logged(**trainer_kwargs(tmp_path, epochs=1), report_to=None)
    trainer.train(seed=0)
    assert not (tmp_path / "logs").exists()


def test_unknown_tracker_is_rejected_naming_the_choices(tmp_path):
    with pytest.raises(ValueError, match="unknown tracker 'neptune'.*wandb, mlflow"):
        Logged(**trainer_kwargs(tmp_path), report_to=["tensorboard", "neptune"])


def test_a_missing_tracker_package_is_one_line_naming_the_pip_extra(tmp_path):
    missing = [name for name in TRACKERS[1:] if importlib.util.find_spec(name) is None]
    if not missing:
        pytest.skip("every tracker package is installed here")
    name = missing[0]
    with pytest.raises(ImportError) as raised:
        Logged(**trainer_kwargs(tmp_path), report_to=["tensorboard", name])
    message = str(raised.value)
    assert f"pip install accel_hydra[{name}]" in message and "\n" not in message


def test_tracker_kwargs_for_a_tracker_not_logged_to_is_refused(tmp_path):
    with pytest.raises(ValueError, match="tracker_kwargs has an entry for 'wandb'"):
        Logged(**trainer_kwargs(tmp_path), tracker_kwargs={"wandb": {"project": "p"}})


@dataclass(kw_only=True, eq=False)
class RemoteLogsSeen(ToyTrainer):
    """Records, at the end of each epoch, which event files the remote log_dir holds."""

    seen: list = field(default_factory=list)

    def on_train_epoch_end(self):
        fs, root = fsspec.core.url_to_fs(self.log_dir)
        self.seen.append(fs.glob(f"{root}/events.out.tfevents.*"))


def test_remote_log_dir_is_filled_at_each_checkpoint_not_only_at_the_end(tmp_path):
    log_dir = f"memory://logs-{uuid.uuid4().hex}/run"
    trainer = RemoteLogsSeen(**trainer_kwargs(tmp_path), log_dir=log_dir, log_every_n_steps=5)
    trainer.train(seed=0)
    # Epoch 1 ended after its checkpoint: the event file was already copied then.
    assert trainer.seen[0], "no event file in the remote log_dir after the first checkpoint"
    assert not os.path.exists(tmp_path / "logs")
    events = read_events(_download(log_dir, tmp_path / "copy"))
    assert {"train/loss", "val/loss"} <= set(events.Tags()["scalars"])


def _download(url, local):
    fs, root = fsspec.core.url_to_fs(url)
    fs.get(root + "/", str(local) + "/", recursive=True)
    return local


def test_flushing_the_logs_writes_an_event_the_writer_thread_has_not_taken_yet(
    tmp_path, monkeypatch
):
    """A checkpoint flushes the event files; an event logged just before it must be
    on disk then, even while tensorboardX's writer thread lags (here: slowed)."""
    import glob
    import time

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboardX import SummaryWriter
    from tensorboardX.event_file_writer import EventsWriter

    from accel_hydra.event_files import flush_event_files

    write_event = EventsWriter.write_event

    def slow_write_event(self, event):
        time.sleep(0.3)
        return write_event(self, event)

    monkeypatch.setattr(EventsWriter, "write_event", slow_write_event)
    writer = SummaryWriter(logdir=str(tmp_path))
    writer.add_scalar("train/loss", 1.5, global_step=20)
    flush_event_files(writer)
    (path,) = glob.glob(str(tmp_path / "events*"))
    steps = [
        event.step
        for event in EventFileLoader(path).Load()
        if any(value.tag == "train/loss" for value in event.summary.value)
    ]
    assert steps == [20]
    writer.add_scalar("train/loss", 1.4, global_step=21)  # the writer still works
    writer.close()
    steps = [
        event.step
        for event in EventFileLoader(path).Load()
        if any(value.tag == "train/loss" for value in event.summary.value)
    ]
    assert steps == [20, 21]


def test_events_are_written_on_the_training_thread_with_no_writer_threads(tmp_path, monkeypatch):
    """Every event of a run lands in the file from the thread that logged it: no
    queue, no feeder or worker thread taking the GIL from training, and every event
    is in the file, in order, when a step's log returns and the writer flushes."""
    import threading

    from tensorboardX.event_file_writer import EventsWriter

    writers, on_disk = set(), []
    write_event = EventsWriter.write_event

    def recording_write_event(self, event):
        writers.add(threading.current_thread().name)
        return write_event(self, event)

    monkeypatch.setattr(EventsWriter, "write_event", recording_write_event)

    @dataclass(kw_only=True, eq=False)
    class Watching(ToyTrainer):
        def on_train_epoch_end(self):
            self._writer.flush()  # a plain flush: nothing may wait in a queue
            on_disk.append(sorted(read_events(self.log_dir).Tags()["scalars"]))
            on_disk.append(sorted(t.name for t in threading.enumerate() if t.name != "MainThread"))

    trainer = Watching(**trainer_kwargs(tmp_path, epochs=1), log_every_n_steps=2)
    trainer.train(seed=0)
    assert writers == {"MainThread"}
    assert "train/loss" in on_disk[0] and "val/loss" in on_disk[0]
    assert not [name for name in on_disk[1] if "Feeder" in name or name.startswith("Thread-")]


def test_a_resumed_writer_keeps_its_purge_events_first(tmp_path):
    """The events tensorboardX queues when it opens a file at a purge step are
    written before anything logged after the switch to direct writes."""
    import glob

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboardX import SummaryWriter

    from accel_hydra.event_files import DirectEventWriter, write_directly

    writer = SummaryWriter(logdir=str(tmp_path), purge_step=7)
    write_directly(writer)
    assert isinstance(writer.file_writer.event_writer, DirectEventWriter)
    writer.add_scalar("train/loss", 0.5, global_step=8)
    writer.flush()
    (path,) = glob.glob(str(tmp_path / "events*"))
    events = list(EventFileLoader(path).Load())
    assert [e.step for e in events][-3:] == [7, 7, 8]
    assert events[-2].session_log.status == events[-2].session_log.START
    writer.close()
    writer.close()  # twice is harmless, as with tensorboardX's own writer


@pytest.mark.parametrize(
    ("tag", "value"),
    [
        ("train/loss", 0.25),
        ("train/samples_per_sec", 12345),
        ("/leading/slash", 1.5),
        ("odd tag (with) spaces:and:colons", -3.0),
        ("val/acc", float("nan")),
        ("val/inf", float("inf")),
        ("flag", True),  # not float or int: tensorboardX's own add_scalar
    ],
)
def test_a_scalar_event_is_what_tensorboardx_writes(tmp_path, tag, value):
    """The scalars the trainer builds itself read back exactly like tensorboardX's."""
    import glob
    import math

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboardX import SummaryWriter

    from accel_hydra.event_files import add_scalar, write_directly

    def written(directory, write):
        writer = SummaryWriter(logdir=str(directory))
        write_directly(writer)
        write(writer)
        writer.close()
        (path,) = glob.glob(str(directory / "events*"))
        return [
            (v.tag, v.simple_value, event.step)
            for event in EventFileLoader(path).Load()
            for v in event.summary.value
        ]

    fell_back = []

    def ours_write(writer):
        original = writer.add_scalar
        writer.add_scalar = lambda *a, **k: fell_back.append(1) or original(*a, **k)
        add_scalar(writer, tag, value, 7)

    ours = written(tmp_path / "ours", ours_write)
    assert bool(fell_back) == (type(value) not in (float, int))  # built by us otherwise
    theirs = written(tmp_path / "theirs", lambda w: w.add_scalar(tag, value, global_step=7))
    assert len(ours) == len(theirs) == 1
    (ours_tag, ours_value, ours_step), (tag_x, value_x, step_x) = ours[0], theirs[0]
    assert (ours_tag, ours_step) == (tag_x, step_x)
    assert ours_value == value_x or (math.isnan(ours_value) and math.isnan(value_x))
