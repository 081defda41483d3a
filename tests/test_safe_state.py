"""Nothing in a checkpoint runs code; a changed setup is refused before anything loads;
credentials in a checkpoint URL never reach output, files or checkpoint bytes."""

from __future__ import annotations

import functools
import os
import pickle
import shutil
import sys

import pytest
import torch

from accel_hydra import CheckpointMixin, MetricMonitor
from accel_hydra.cli import main
from accel_hydra.mixins.checkpoint import TRAINER_STATE_FILE, object_state_file
from accel_hydra.safe_state import (
    UnsafeCheckpointError,
    check_code_free,
    load_object_state,
    load_trainer_state,
    save_trainer_state,
)
from accel_hydra.storage import MARKER, CheckpointStore
from tests.conftest import ToyTrainer, compose, make_model, run_module, trainer_kwargs
from tests.storage_servers import free_port, start_server

Checkpointed = compose(CheckpointMixin)


class Counter:
    """A user object saved through ``checkpoint_objects``."""

    def __init__(self):
        self.count = torch.zeros(())

    def state_dict(self):
        return {"count": self.count.clone()}

    def load_state_dict(self, state):
        self.count = state["count"].clone()


class Payload:
    """What an attacker puts in a checkpoint: unpickling it creates ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@functools.cache
def _object_trainer_class():
    cls = type(
        "WithObjects",
        (ToyTrainer,),
        {
            "__annotations__": {},
            "checkpoint_objects": property(lambda self: [self.counter]),
            "on_train_epoch_end": lambda self: self.counter.count.add_(1),
        },
    )
    from dataclasses import dataclass

    return dataclass(kw_only=True, eq=False)(cls)


def _trainer(project, epochs, **overrides):
    torch.manual_seed(0)
    model = make_model()
    kwargs = trainer_kwargs(
        project,
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=0.01),
        epochs=epochs,
    )
    kwargs.update(overrides)
    trainer = _object_trainer_class()(
        **kwargs, metric_monitor=MetricMonitor(metric_name="loss"), report_to=None
    )
    trainer.counter = Counter()
    return trainer


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A run directory with committed epoch_1 and epoch_2 (and best)."""
    project = tmp_path_factory.mktemp("base")
    _trainer(project, epochs=2, save_last_k=2).train(seed=0)
    return project


def _copy_run(source, target):
    shutil.copytree(source, target)
    return target


def _forge(checkpoint_dir, name, filename, content):
    """Replace one file of a committed checkpoint and re-commit it with a valid marker,
    as someone with write access to the directory can."""
    store = CheckpointStore(str(checkpoint_dir))
    info = {k: v for k, v in store.read_marker(name).items() if k != "files"}
    staged = store.staging_dir(name)
    shutil.copytree(store.path(name), staged)
    os.remove(os.path.join(staged, MARKER))
    if filename == "accel_hydra_trainer_state.pt":  # a legacy state is read only without JSON
        os.remove(os.path.join(staged, TRAINER_STATE_FILE))
    with open(os.path.join(staged, filename), "wb") as f:
        f.write(content)
    store.commit(name, staged, info)


def _payload(kind, sentinel):
    if kind == "pickle":
        return pickle.dumps(Payload(str(sentinel)))
    path = str(sentinel) + ".src"
    torch.save({"state": Payload(str(sentinel))}, path)
    with open(path, "rb") as f:
        return f.read()


PICKLE_CAPABLE = [
    "optimizer.bin",
    "random_states_0.pkl",
    object_state_file(0),
    "accel_hydra_trainer_state.pt",  # the legacy trainer-state format, still read
    "custom_checkpoint_0.pkl",  # where Accelerate keeps registered objects: never read
]
USER_OBJECT_FILES = {object_state_file(0)}


@pytest.mark.parametrize("kind", ["torch", "pickle"])
@pytest.mark.parametrize("filename", PICKLE_CAPABLE)
def test_a_forged_pickle_never_runs_and_is_named(two_checkpoints, tmp_path, capsys, filename, kind):
    project = _copy_run(two_checkpoints, tmp_path / "run")
    sentinel = tmp_path / "code_ran"
    _forge(project / "checkpoints", "epoch_2", filename, _payload(kind, sentinel))

    trainer = _trainer(project, epochs=3, resume_from_checkpoint="latest")
    if filename in USER_OBJECT_FILES:
        # A user object's own type may legitimately need allowing: stop and say how,
        # instead of quarantining every checkpoint of the run one after another.
        with pytest.raises(UnsafeCheckpointError) as err:
            trainer.train(seed=0)
        assert not sentinel.exists(), "a checkpoint file ran code on resume"
        assert filename in str(err.value)
        if kind == "torch":  # the type is named, with the way to allow it if trusted
            assert "add_safe_globals([io.open])" in str(err.value)
        return
    trainer.train(seed=0)

    assert not sentinel.exists(), "a checkpoint file ran code on resume"
    out = capsys.readouterr().out
    assert f"skipping epoch_2: checkpoint {project / 'checkpoints' / 'epoch_2'}" in out
    assert filename in out.split("skipping epoch_2")[1].splitlines()[0]
    # Fell back to the older good checkpoint and finished the run from there.
    assert trainer.resumed_from in {"epoch_1", "best"}
    assert trainer.epoch == 3


def test_a_forged_trainer_state_file_is_damaged_not_code(two_checkpoints, tmp_path, capsys):
    project = _copy_run(two_checkpoints, tmp_path / "run")
    _forge(project / "checkpoints", "epoch_2", TRAINER_STATE_FILE, b"\xff\xfe not json")
    trainer = _trainer(project, epochs=3, resume_from_checkpoint="latest")
    trainer.train(seed=0)
    out = capsys.readouterr().out
    assert "skipping epoch_2" in out and TRAINER_STATE_FILE in out
    assert trainer.resumed_from in {"epoch_1", "best"}


def test_checkpoint_objects_are_stored_without_pickle_of_code(two_checkpoints):
    checkpoint = two_checkpoints / "checkpoints" / "epoch_2"
    # Readable by the restricted loader as it is: tensors and containers only.
    assert float(load_object_state(str(checkpoint / object_state_file(0)), "c")["count"]) == 1
    state = load_trainer_state(str(checkpoint / TRAINER_STATE_FILE))
    assert (state["progress"]["epoch"], state["progress"]["step"]) == (2, 24)
    assert not any(name.startswith("custom_checkpoint") for name in os.listdir(checkpoint))


def test_a_user_type_is_refused_with_the_way_to_allow_it(tmp_path):
    path = str(tmp_path / "obj.pt")
    torch.save({"when": Counter()}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_object_state(path, "checkpoint_objects[0] (Counter)")
    message = str(err.value)
    assert "test_safe_state.Counter" in message
    assert "torch.serialization.add_safe_globals" in message
    with torch.serialization.safe_globals([Counter]):
        assert isinstance(load_object_state(path, "x")["when"], Counter)


def test_trainer_state_round_trips_through_json(tmp_path):
    state = {
        "tuple": (1, 2.5),
        "int_keys": {3: "x"},
        "inf": float("-inf"),
        "tensor": torch.arange(4.0).reshape(2, 2),
        "nested": [{"a": None, "b": True}],
    }
    path = str(tmp_path / "state.json")
    save_trainer_state(state, path)
    loaded = load_trainer_state(path)
    assert loaded["tuple"] == (1, 2.5) and loaded["int_keys"] == {3: "x"}
    assert loaded["inf"] == float("-inf") and loaded["nested"] == [{"a": None, "b": True}]
    assert torch.equal(loaded["tensor"], state["tensor"])
    for bad in (b"[]", b"{", b'{"x": {"__tensor__": {"dtype": "os.system"}}}', b"\xff"):
        with open(path, "wb") as f:
            f.write(bad)
        with pytest.raises(ValueError):
            load_trainer_state(path)


def test_a_trainer_state_json_cannot_hold_leaves_no_file_behind(tmp_path):
    # Encoded before the file is opened: a stage never holds a cut-off state file.
    path = tmp_path / "state.json"
    with pytest.raises(TypeError, match="JSON cannot store"):
        save_trainer_state({"ok": 1, "bad": object()}, str(path))
    assert not path.exists()


def test_non_archive_is_refused_without_unpickling(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(pickle.dumps(Payload(str(tmp_path / "ran"))))
    with pytest.raises(UnsafeCheckpointError, match="not a torch archive"):
        check_code_free(str(path))
    assert not (tmp_path / "ran").exists()


# ------------------------------------------------------------------ a changed setup


def _base_run(tmp_path, **extra):
    torch.manual_seed(0)
    model = make_model()
    trainer = Checkpointed(
        **trainer_kwargs(
            tmp_path, model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.01)
        ),
        **extra,
    )
    trainer.train(seed=0)
    return trainer


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            "sgd",
            "saved with optimizer AdamW (1 param group(s) of 4 tensors); this run has "
            "optimizer SGD (1 param group(s) of 4 tensors)",
        ),
        ("two_groups", "this run has optimizer AdamW (2 param group(s) of 2, 2 tensors)"),
        ("add_scheduler", "was saved without an LR scheduler and this run has LinearLR"),
        ("remove_scheduler", "was saved with LinearLR and this run has no lr_scheduler"),
    ],
)
def test_resume_with_another_setup_fails_in_one_line_before_loading(tmp_path, change, expected):
    from accel_hydra import LRSchedulingMixin

    Scheduled = compose(CheckpointMixin, LRSchedulingMixin)
    linear = functools.partial(torch.optim.lr_scheduler.LinearLR)
    first = _base_run(tmp_path) if change != "remove_scheduler" else None
    if change == "remove_scheduler":
        torch.manual_seed(0)
        model = make_model()
        Scheduled(
            **trainer_kwargs(
                tmp_path, model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.01)
            ),
            lr_scheduler=linear,
        ).train(seed=0)
    del first
    torch.manual_seed(0)
    model = make_model()
    params = list(model.parameters())
    optimizer = {
        "sgd": torch.optim.SGD(params, lr=0.01),
        "two_groups": torch.optim.AdamW([{"params": params[:2]}, {"params": params[2:]}]),
    }.get(change, torch.optim.AdamW(params, lr=0.01))
    kwargs = trainer_kwargs(
        tmp_path, model=model, optimizer=optimizer, epochs=3, resume_from_checkpoint="latest"
    )
    if change == "add_scheduler":
        trainer = Scheduled(**kwargs, lr_scheduler=linear)
    elif change == "remove_scheduler":
        trainer = Scheduled(**kwargs)
    else:
        trainer = Checkpointed(**kwargs)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as err:
        trainer.train(seed=0)
    message = str(err.value)
    assert expected in message and "\n" not in message
    assert "resume_from_checkpoint=null" in message and "model weights" in message
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


# ------------------------------------------------------------------ credentials in URLs

PASSWORD = "pw-Xq7-never-shown"


@pytest.fixture
def ftp_url(tmp_path):
    """A real FTP server (pyftpdlib) with a password, on 127.0.0.1; stopped by PID."""
    pytest.importorskip("pyftpdlib")
    root = tmp_path / "ftp_root"
    root.mkdir()
    port = free_port()
    command = [
        sys.executable, "-m", "pyftpdlib", "-i", "127.0.0.1", "-p", str(port), "-w",
        "-d", str(root), "-u", "alice", "-P", PASSWORD,
    ]  # fmt: skip
    server = start_server("ftp", command, port, str(tmp_path))
    try:
        yield f"ftp://alice:{PASSWORD}@127.0.0.1:{port}/run", root
    finally:
        server.stop()


def test_a_password_in_the_checkpoint_url_is_never_shown_or_stored(tmp_path, ftp_url, capsys):
    url, ftp_root = ftp_url
    project = tmp_path / "project"
    common = [
        "-c", os.path.join("examples", "digits", "configs", "train.yaml"),
        "-o", f"trainer.project_dir={project}", f"trainer.checkpoint_dir={url}",
    ]  # fmt: skip
    # A mistake that quotes the override back must not show the password either.
    assert main([*common[:-1], f"trainer.checkpoint_dirr={url}"]) == 2
    typo = capsys.readouterr()
    assert "alice:***@" in typo.err
    common[-1] = f"+{common[-1]}"  # the example's YAML has no checkpoint_dir key
    first = run_module("accel_hydra.train_entry", *common, "trainer.epochs=1")
    assert first.returncode == 0, first.stderr[-3000:]
    second = run_module(
        "accel_hydra.train_entry", *common, "trainer.epochs=1",
        "+trainer.resume_from_checkpoint=latest",
    )  # fmt: skip
    assert second.returncode == 0, second.stderr[-3000:]
    output = typo.out + typo.err + first.stdout + first.stderr + second.stdout + second.stderr
    assert (
        "resumed from ftp://alice:***@" in output
        and "ftp://alice:***@127.0.0.1" in output.split("best checkpoint")[-1]
    )
    assert PASSWORD not in output
    files = [p for base in (project, ftp_root) for p in base.rglob("*") if p.is_file()]
    assert any(p.name == "config.yaml" for p in files)
    assert any("tfevents" in p.name for p in files)
    assert any(p.name == TRAINER_STATE_FILE for p in files)
    leaked = [str(p) for p in files if PASSWORD.encode() in p.read_bytes()]
    assert not leaked, f"password found in {leaked}"
