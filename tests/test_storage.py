import json
import os
import uuid

import pytest

from accel_hydra.marker import marker_bytes
from accel_hydra.retention import checkpoints_to_prune
from accel_hydra.storage import (
    MARKER,
    CheckpointCorruptError,
    CheckpointNotFoundError,
    CheckpointStore,
    MissingBucketError,
    bounded_storage_options,
    staged_records,
)


def stage(store, name, payload="weights"):
    staged = store.staging_dir(name)
    os.makedirs(staged, exist_ok=True)
    with open(os.path.join(staged, "model.bin"), "w") as f:
        f.write(payload)
    return staged


def commit(store, name, step, epoch=0, payload="weights"):
    store.commit(name, stage(store, name, payload), {"step": step, "epoch": epoch})


def test_commit_writes_marker_and_lists_checkpoint(tmp_path):
    store = CheckpointStore(str(tmp_path))
    commit(store, "step_5", 5)
    assert json.loads((tmp_path / "step_5" / MARKER).read_text())["step"] == 5
    assert list(store.committed()) == ["step_5"]
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_directory_without_marker_does_not_exist(tmp_path):
    store = CheckpointStore(f"file://{tmp_path}")
    commit(store, "step_5", 5)
    (tmp_path / "step_9").mkdir()
    (tmp_path / "step_9" / "model.bin").write_text("half")
    assert set(store.committed()) == {"step_5"}
    assert store.latest() == "step_5"
    with pytest.raises(CheckpointNotFoundError, match="step_9 has no commit marker"):
        store.fetch("step_9")


def test_latest_is_most_progress_not_name(tmp_path):
    store = CheckpointStore(str(tmp_path))
    commit(store, "step_10", 10)
    commit(store, "step_9", 9)
    commit(store, "best", 10, 1)
    commit(store, "epoch_1", 10, 1)
    assert store.latest() == "epoch_1"


def test_replacing_best_keeps_only_new_contents(tmp_path):
    store = CheckpointStore(str(tmp_path))
    commit(store, "best", 1, payload="old")
    commit(store, "best", 2, payload="new")
    assert (tmp_path / "best" / "model.bin").read_text() == "new"
    assert store.read_marker("best")["step"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_recover_finishes_an_interrupted_swap(tmp_path):
    store = CheckpointStore(str(tmp_path))
    commit(store, "best", 1, payload="old")
    # Killed between the two renames: the old best moved aside, the new one staged.
    os.rename(tmp_path / "best", tmp_path / ".retired-best")
    staged = stage(store, "best", "new")
    with open(os.path.join(staged, MARKER), "wb") as f:
        f.write(marker_bytes({"step": 2, "epoch": 0}, staged_records(staged)))
    assert store.committed() == {}
    store.recover()
    assert (tmp_path / "best" / "model.bin").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_delete_removes_marker_and_files(tmp_path):
    store = CheckpointStore(str(tmp_path))
    commit(store, "step_1", 1)
    store.delete("step_1")
    assert not (tmp_path / "step_1").exists()


def test_fetch_missing_names_the_path(tmp_path):
    store = CheckpointStore(str(tmp_path))
    with pytest.raises(CheckpointNotFoundError, match=f"{tmp_path}/step_3 does not exist"):
        store.fetch("step_3")


def test_memory_filesystem_round_trip(tmp_path):
    store = CheckpointStore("memory://accel-hydra-test/run")
    commit(store, "step_1", 1, payload="remote")
    commit(store, "step_2", 2)
    assert store.latest() == "step_2"
    local = store.fetch("step_1", cache_dir=str(tmp_path))
    with open(os.path.join(local, "model.bin")) as f:
        assert f.read() == "remote"
    store.delete("step_1")
    assert set(store.committed()) == {"step_2"}


def test_object_store_commit_list_replace_fetch_delete(tmp_path, backend):
    bucket = backend.new_bucket()
    store = CheckpointStore(f"{bucket}/run", backend.storage_options)
    commit(store, "step_1", 1, payload="one")
    commit(store, "best", 1, payload="old")
    commit(store, "best", 2, payload="new")
    fs = backend.filesystem()
    root = bucket.split("://", 1)[1]
    fs.pipe(f"{root}/run/step_9/model.bin", b"upload cut short")  # no marker
    fs.pipe(f"{root}/run-old/step_5/{MARKER}", b'{"step": 5, "epoch": 0}')

    assert store.committed().keys() == {"step_1", "best"}
    assert store.latest() == "best"
    with open(os.path.join(store.fetch("best", cache_dir=str(tmp_path)), "model.bin")) as f:
        assert f.read() == "new"
    store.delete("step_1")
    assert store.committed().keys() == {"best"}
    assert fs.exists(f"{root}/run-old/step_5/{MARKER}")
    assert not os.path.exists(store.staging_dir("best"))


@pytest.mark.parametrize(
    "raw",
    [b"", b"{}", b"[]", b'{"step": "abc", "epoch": 0}', b'{"step": 9, "\xff": 0}'],
    ids=["empty", "{}", "list", "step abc", "invalid UTF-8"],
)
def test_a_malformed_marker_never_blocks_latest_or_retention(tmp_path, raw):
    store = CheckpointStore(str(tmp_path))
    commit(store, "step_3", 3)
    commit(store, "step_9", 9)
    (tmp_path / "step_9" / MARKER).write_bytes(raw)
    assert store.latest() == "step_3"
    assert checkpoints_to_prune(store.committed(), 1, newest="step_3") == []
    with pytest.raises(CheckpointCorruptError, match="step_9 is damaged") as err:
        store.fetch("step_9")
    assert err.value.damaged


@pytest.mark.parametrize("url", ["memory://", "local"])
def test_fetch_never_writes_outside_its_cache(tmp_path, url):
    escape = "../../../../../escape.pth"
    if url == "local":
        store = CheckpointStore(str(tmp_path / "store" / "run"))
    else:
        store = CheckpointStore(f"memory://traversal-{uuid.uuid4().hex}/run")
    commit(store, "step_9", 9)
    if url != "local":  # what an attacker can write: a file where the name leads
        store.fs.pipe_file(f"{store.path('step_9')}/{escape}", b"owned")
    marker = {"step": 9, "epoch": 0, "files": {"model.bin": 7, escape: 5}}
    store.fs.pipe_file(f"{store.path('step_9')}/{MARKER}", json.dumps(marker).encode())
    cache = tmp_path / "work" / "cache"
    with pytest.raises(CheckpointCorruptError, match="step_9 is damaged"):
        store.fetch("step_9", cache_dir=str(cache))
    written = [p for p in tmp_path.rglob("escape.pth") if "store" not in p.parts]
    assert written == [] and store.latest() is None


def test_quarantine_on_an_object_store_keeps_the_bytes_aside(tmp_path, backend):
    store = CheckpointStore(f"{backend.new_bucket()}/run", backend.storage_options)
    commit(store, "step_1", 1, payload="good")
    commit(store, "step_2", 2, payload="damaged")
    assert store.quarantine("step_2") == ".corrupt-step_2"
    assert store.latest() == "step_1"
    hidden = store.path(".corrupt-step_2")
    assert store.fs.cat_file(f"{hidden}/model.bin") == b"damaged"
    assert store.fs.exists(f"{hidden}/{MARKER}")
    assert not store.fs.exists(store.path("step_2"))


def test_missing_bucket_is_named_at_once(backend):
    missing = f"{backend.protocol}://no-such-{uuid.uuid4().hex[:8]}/run"
    store = CheckpointStore(missing, backend.storage_options, timeout=10)
    with pytest.raises(MissingBucketError) as err:
        store.check_bucket()
    kind = "container" if backend.name == "azure" else "bucket"
    assert str(err.value) == (
        f"checkpoint_dir {missing}: {kind} '{missing.split('/')[2]}' does not exist; "
        "create it, or fix the URL in checkpoint_dir"
    )
    CheckpointStore(backend.new_bucket() + "/run", backend.storage_options).check_bucket()


def test_timeouts_are_added_without_overriding_the_users_options():
    user = {"key": "k", "config_kwargs": {"read_timeout": 5}}
    s3 = bounded_storage_options("s3", user, 30)
    assert s3["config_kwargs"] == {
        "read_timeout": 5,
        "connect_timeout": 30,
        "retries": {"total_max_attempts": 2, "mode": "standard"},
    }
    assert user == {"key": "k", "config_kwargs": {"read_timeout": 5}}  # not modified
    assert bounded_storage_options("gs", {}, 30) == {"requests_timeout": 30}
    assert bounded_storage_options("az", {"read_timeout": 9}, 30) == {
        "read_timeout": 9,
        "connection_timeout": 30,
    }
    assert bounded_storage_options("file", {}, 30) == {}
    assert bounded_storage_options("s3", user, None) == user


def test_a_checkpoint_of_the_previous_release_still_resumes(tmp_path):
    """Markers written before checksums (sizes only) are verified by size, not damaged."""
    store = CheckpointStore(str(tmp_path))
    (tmp_path / "step_4").mkdir()
    (tmp_path / "step_4" / "model.bin").write_bytes(b"weights")
    legacy = {"step": 4, "epoch": 0, "batches_in_epoch": 4, "files": {"model.bin": 7}}
    (tmp_path / "step_4" / MARKER).write_text(json.dumps(legacy))
    assert store.latest() == "step_4"
    assert store.fetch("step_4") == store.path("step_4")
    (tmp_path / "step_4" / "model.bin").write_bytes(b"weight")  # the size still counts
    with pytest.raises(CheckpointCorruptError, match="model.bin has 6 bytes, not 7"):
        store.fetch("step_4")


def test_replacing_best_on_an_object_store_never_loses_the_committed_one(backend):
    store = CheckpointStore(f"{backend.new_bucket()}/run", backend.storage_options)
    commit(store, "best", 1, payload="old")
    # What replacing it does first; the run dies before the new files are stored.
    store.clear_target("best")
    store.fs.pipe_file(f"{store.path('best')}/model.bin", b"half of the new")
    assert store.latest() is None  # nothing committed under the name meanwhile
    CheckpointStore(store.url, backend.storage_options).recover()  # the next start
    assert store.latest() == "best"
    assert store.fs.cat_file(f"{store.path('best')}/model.bin") == b"old"
    store.verify("best")
    commit(store, "best", 2, payload="new")  # a replacement that finishes
    assert store.fs.cat_file(f"{store.path('best')}/model.bin") == b"new"
    store.fs.invalidate_cache()
    assert not store.fs.exists(store.path(".retired-best"))
