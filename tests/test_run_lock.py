"""The run lock: a local lock file (flock) and a remote lease on a real S3 server (moto)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid

import pytest

from accel_hydra.run_lock import (
    LEASE_FILE,
    LOCK_FILE,
    Holder,
    LocalRunLock,
    RemoteLease,
    RunLockHeldError,
)
from accel_hydra.storage import CheckpointStore
from tests.conftest import ToyTrainer, trainer_kwargs


def dead_pid() -> int:
    """The pid of a process that has just exited (and was reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_second_local_lock_fails_naming_the_holder_until_released(tmp_path):
    first = LocalRunLock(str(tmp_path), "run-a")
    assert first.acquire() is None
    with pytest.raises(RunLockHeldError) as held:
        LocalRunLock(str(tmp_path), "run-b").acquire()
    message = str(held.value)
    assert "\n" not in message
    assert f"pid {os.getpid()} on host {socket.gethostname()}, running since " in message
    assert str(tmp_path / LOCK_FILE) in message

    first.release()
    assert not (tmp_path / LOCK_FILE).exists()
    second = LocalRunLock(str(tmp_path), "run-b")
    assert second.acquire() is None
    second.release()


def test_lock_file_of_a_dead_process_is_taken_over_with_a_notice(tmp_path):
    pid = dead_pid()
    stale = Holder(socket.gethostname(), pid, time.time() - 60, "run-a", time.time() - 60)
    (tmp_path / LOCK_FILE).write_text(stale.to_json())

    lock = LocalRunLock(str(tmp_path), "run-b")
    notice = lock.acquire()

    assert f"took over the lock of {tmp_path} left by pid {pid}" in notice
    assert Holder.parse((tmp_path / LOCK_FILE).read_text()).pid == os.getpid()
    lock.release()


def test_remote_lease_held_then_released(s3):
    store = CheckpointStore(s3.new_bucket() + "/run", s3.storage_options)
    first = RemoteLease(store.fs, store.root, store.display(), "run-a")
    assert first.acquire() is None
    with pytest.raises(RunLockHeldError, match=f"in use by pid {os.getpid()} on host "):
        RemoteLease(store.fs, store.root, store.display(), "run-b").acquire()

    first.release()
    assert not store.fs.exists(f"{store.root}/{LEASE_FILE}")
    second = RemoteLease(store.fs, store.root, store.display(), "run-b")
    assert second.acquire() is None
    second.release()


@pytest.mark.parametrize("left_by", ["other host, expired", "dead process, this host"])
def test_stale_remote_lease_is_taken_over_with_a_notice(s3, left_by):
    store = CheckpointStore(s3.new_bucket() + "/run", s3.storage_options)
    if left_by == "dead process, this host":
        stale = Holder(socket.gethostname(), dead_pid(), time.time(), "run-a", time.time())
        why = "that process is gone"
    else:  # a live-looking pid elsewhere, silent for longer than the lease
        stale = Holder("elsewhere", os.getpid(), time.time() - 600, "run-a", time.time() - 300)
        why = "its lease expired 300 s after its last renewal"
    store.fs.pipe_file(f"{store.root}/{LEASE_FILE}", stale.to_json().encode())

    lease = RemoteLease(store.fs, store.root, store.display(), "run-b", lease_seconds=120)
    notice = lease.acquire()

    assert f"took over the lease of {store.display()} left by pid {stale.pid} on host" in notice
    assert why in notice
    lease.release()


def test_remote_lease_is_renewed_while_the_run_lives(s3):
    store = CheckpointStore(s3.new_bucket() + "/run", s3.storage_options)
    lease = RemoteLease(store.fs, store.root, store.display(), "run-a", lease_seconds=0.4)
    lease.acquire()
    try:
        first = lease.read().renewed
        time.sleep(0.5)
        assert lease.read().renewed > first
    finally:
        lease.release()


def test_a_run_on_a_leased_s3_directory_fails_at_start_naming_the_holder(tmp_path, s3, capsys):
    url = s3.new_bucket() + "/run"
    store = CheckpointStore(url, s3.storage_options)
    holder = Holder("gpu-node-7", 4242, time.time() - 3600, "run-a", time.time())
    store.fs.pipe_file(f"{store.root}/{LEASE_FILE}", holder.to_json().encode())
    trainer = ToyTrainer(
        **trainer_kwargs(tmp_path),
        checkpoint_dir=url,
        storage_options=s3.storage_options,
        resume_from_checkpoint="latest",
    )

    with pytest.raises(RunLockHeldError) as held:
        trainer.train(seed=0)

    expected = f"checkpoint_dir {url} is in use by pid 4242 on host gpu-node-7, running since"
    assert str(held.value).startswith(expected)
    assert trainer.step == 0
    assert "starting" not in capsys.readouterr().out
    # Its lease is untouched: the holder goes on.
    assert json.loads(store.fs.cat_file(f"{store.root}/{LEASE_FILE}"))["pid"] == 4242


def test_a_finished_run_leaves_no_lock_and_a_second_run_may_follow(tmp_path):
    checkpoints = tmp_path / f"ckpt-{uuid.uuid4().hex[:6]}"
    for epochs in (1, 2):
        trainer = ToyTrainer(
            **trainer_kwargs(tmp_path, epochs=epochs),
            checkpoint_dir=str(checkpoints),
            resume_from_checkpoint="latest",
        )
        trainer.train(seed=0)
        assert not (checkpoints / LOCK_FILE).exists()
    assert trainer.resumed_from == "epoch_1"
