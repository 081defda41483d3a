"""Trackers through Accelerate's integrations, with the real packages: MLflow on a local
file store and W&B in offline mode get exactly what TensorBoard gets, and a SIGKILLed,
resumed run continues the same tracker runs with every step once.

The packages are installed (pinned) in tox's torch213 env only; elsewhere these tests
skip, saying so.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import struct
from dataclasses import dataclass

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from accel_hydra.trackers import continue_kwargs, resolve_report_to
from tests.conftest import ToyTrainer, run_module, trainer_kwargs

_SKIP = "tracker tests need mlflow-skinny and wandb (pinned in tox's torch213 env only)"
mlflow = pytest.importorskip("mlflow", reason=_SKIP)
wandb = pytest.importorskip("wandb", reason=_SKIP)
from mlflow import MlflowClient  # noqa: E402
from wandb.proto import wandb_internal_pb2  # noqa: E402

CONFIG = {"optimizer": {"lr": 0.05}, "storage": {"secret_key": "hunter2"}}


@pytest.fixture
def tracker_env(tmp_path, monkeypatch):
    """MLflow on a file store under tmp_path, W&B offline: nothing leaves the machine."""
    env = {
        "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
        # MLflow 3 keeps the file store behind this switch (no database server needed).
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp_path),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    # wandb.init in this process (an earlier test) exports its service's address; a
    # subprocess would join that service, which still holds the killed run's id.
    monkeypatch.delenv("WANDB_SERVICE", raising=False)
    # A killed run leaves wandb's temporary media and artifact directories behind: in
    # the subprocesses, temporary files go below tmp_path, not into the machine's /tmp.
    (tmp_path / "tmp").mkdir()
    return {**env, "TMPDIR": str(tmp_path / "tmp")}


@dataclass(kw_only=True, eq=False)
class UserLogging(ToyTrainer):
    def on_train_epoch_end(self):
        self.accelerator.log({"user/epoch_marker": float(self.epoch)}, step=self.step)

    def on_train_end(self):
        self.log({"custom/value": 3.5}, step=7)


def train(tmp_path, **overrides):
    kwargs = trainer_kwargs(tmp_path, config_dict=CONFIG)
    kwargs.update(log_every_n_steps=5, max_grad_norm=10.0, save_every_n_epochs=None)
    kwargs.update(overrides)
    UserLogging(**kwargs).train(seed=0)


def tensorboard_scalars(log_dir):
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        key: [(e.step, e.value) for e in events.Scalars(key)] for key in events.Tags()["scalars"]
    }


def the_mlflow_run(experiment):
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1, f"{len(runs)} MLflow runs in {experiment}"
    return runs[0]


def mlflow_scalars(run, as_float32=False):
    client = MlflowClient()
    cast = np.float32 if as_float32 else float
    return {
        key: [(m.step, cast(m.value)) for m in client.get_metric_history(run.info.run_id, key)]
        for key in run.data.metrics
    }


def wandb_records(path):
    """The records of a W&B run file, parsed with wandb's own Record message.

    The file is a LevelDB-style log (7-byte header, 32 KiB blocks of chunks, each
    chunk with a 7-byte header: crc32, length, type) whose records are wandb's
    protobuf ``Record``s; wandb 0.31 ships no Python reader for it.
    """
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    block, pos, chunk, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        chunk += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def wandb_run(root, pattern="offline-run-*"):
    """For each offline run under ``root``: (run record, config, {key: [(step, value)]})."""
    runs = []
    for path in sorted(glob.glob(os.path.join(root, "wandb", pattern, "run-*.wandb"))):
        run, config, history = None, {}, {}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
            elif kind == "config":
                config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                items = {_key(i): json.loads(i.value_json) for i in record.history.item}
                step = items.pop("_step")
                for key, value in items.items():
                    if not key.startswith("_"):
                        history.setdefault(key, []).append((step, value))
        runs.append((run, config, history))
    return runs


def _key(item):
    # wandb splits keys with "/" ("train/loss") into a nested key.
    return item.key or "/".join(item.nested_key)


def test_mlflow_gets_every_scalar_tensorboard_gets(tmp_path, tracker_env):
    train(
        tmp_path,
        report_to=["tensorboard", "mlflow"],
        tracker_kwargs={"mlflow": {"experiment_name": "toy", "run_name": "first"}},
    )
    seen = tensorboard_scalars(tmp_path / "logs")
    assert {"train/loss", "train/lr", "train/grad_norm", "train/samples_per_sec"} <= set(seen)
    assert {"val/loss", "user/epoch_marker", "custom/value"} <= set(seen)
    run = the_mlflow_run("toy")
    # TensorBoard stores float32; MLflow the float it was given.
    assert mlflow_scalars(run, as_float32=True) == seen
    assert run.info.run_name == "first" and run.info.status == "FINISHED"
    assert run.data.params["optimizer.lr"] == "0.05"
    assert run.data.params["storage.secret_key"] == "***"


def test_wandb_offline_and_mlflow_at_once_hold_the_same_metrics(tmp_path, tracker_env):
    wandb_kwargs = {"project": "toy", "name": "first", "tags": ["cpu"], "dir": str(tmp_path)}
    train(
        tmp_path,
        report_to=["wandb", "mlflow"],
        tracker_kwargs={"wandb": wandb_kwargs, "mlflow": {"experiment_name": "toy"}},
    )
    assert not (tmp_path / "logs").exists(), "TensorBoard was not asked for"
    [(run, config, history)] = wandb_run(tmp_path)
    assert (run.project, run.display_name, list(run.tags)) == ("toy", "first", ["cpu"])
    assert config["optimizer.lr"] == 0.05
    assert config["storage.secret_key"] == "***"
    from_mlflow = mlflow_scalars(the_mlflow_run("toy"))
    assert {"train/loss", "val/loss", "user/epoch_marker"} <= set(from_mlflow)
    # custom/value is logged at step 7 after step 24: W&B keeps steps increasing.
    assert history == {k: v for k, v in from_mlflow.items() if k != "custom/value"}


def log_run(project, env, *args):
    return run_module(
        "tests.log_harness",
        "--project",
        project,
        "--log-dir",
        project / "logs",
        "--report-to",
        json.dumps(["tensorboard", "mlflow", "wandb"]),
        "--tracker-kwargs",
        json.dumps({"mlflow": {"experiment_name": "resumed"}, "wandb": {"dir": str(project)}}),
        "--config",
        json.dumps(CONFIG),
        *args,
        env=env,
    )


def test_a_killed_and_resumed_run_continues_the_same_tracker_runs_each_step_once(
    tmp_path, tracker_env
):
    killed = log_run(tmp_path, tracker_env, "--kill-at", 31)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = log_run(tmp_path, tracker_env, "--resume", "latest")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_20" in resumed.stdout and "continued run" in resumed.stdout
    run = the_mlflow_run("resumed")
    losses = mlflow_scalars(run, as_float32=True)["train/loss"]
    assert [step for step, _ in losses] == list(range(1, 37)), "each step once, in order"
    # TensorBoard's purged view holds the uninterrupted run's values (test_logging_exact).
    assert losses == tensorboard_scalars(tmp_path / "logs")["train/loss"]
    assert run.info.status == "FINISHED"
    # Offline, each start writes its own run directory, named after the run id. (The
    # killed one may hold few records: wandb flushes its file every 15 s.)
    first, second = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*")))
    assert first.rsplit("-", 1)[1] == second.rsplit("-", 1)[1], "a new W&B run was started"
    [(_, _, after)] = wandb_run(tmp_path, os.path.basename(second))
    assert [step for step, _ in after["train/loss"]] == list(range(21, 37))


def test_all_is_tensorboard_and_every_installed_tracker():
    assert resolve_report_to("all")[:1] == ("tensorboard",)
    assert {"wandb", "mlflow"} <= set(resolve_report_to("all"))


def test_a_run_id_from_a_checkpoint_is_checked_before_use():
    assert continue_kwargs("wandb", "a1b2c3") == {"id": "a1b2c3", "resume": "allow"}
    with pytest.raises(ValueError, match=r"tracker_runs\['mlflow'\] is not a run id"):
        continue_kwargs("mlflow", "../../elsewhere")
