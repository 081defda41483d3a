"""Shared fixtures: tiny real models and data, a clean Accelerate state per test, and
real object-store servers (S3, GCS, Azure; see tests/storage_servers.py)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from accel_hydra import LoopBase, Trainer

os.environ.setdefault("ACCELERATE_USE_CPU", "true")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_command(command, *, timeout, cwd=REPO, env=None):
    """Run ``command`` in a session of its own and capture its output.

    On a timeout the whole session is killed, not only ``command``: a hung launcher's
    workers (torchrun's ranks) would otherwise run on beside the rest of the suite.

    Raises:
        subprocess.TimeoutExpired: with the output captured up to the kill.
    """
    process = subprocess.Popen(command, cwd=cwd, env=env, text=True, start_new_session=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise subprocess.TimeoutExpired(command, timeout, output=out, stderr=err) from None
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def run_module(module, *args, cwd=REPO, env=None, timeout=300, runner=(sys.executable,)):
    """Run ``python -m module args`` (or under ``runner``, e.g. torchrun) in a real
    subprocess and capture its output."""
    command = [*runner, "-m", module, *map(str, args)]
    return run_command(command, timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


# gcsfs reads it on import; without it every emulated bucket costs a 60 s probe.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; give every test its own."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def regression_data(n: int = 96, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=generator)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.1 * torch.randn(
        n, 1, generator=generator
    )
    return TensorDataset(x, y)


class FixedOrderStream(IterableDataset):
    """Samples as a stream: no ``len()``, the same order every epoch."""

    def __init__(self, data):
        self.data = data

    def __iter__(self):
        return (self.data[i] for i in range(len(self.data)))


def make_loader(n: int = 96, batch_size: int = 8, shuffle: bool = True, seed: int = 0):
    return DataLoader(regression_data(n, seed), batch_size=batch_size, shuffle=shuffle)


def make_model(dropout: float = 0.0) -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 1))


class ToySteps:
    """training_step / validation_step for the regression data, with optional scripted
    validation metrics (one dict per epoch) so tests can dictate what a monitor sees."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.model(x), y)

    def on_validation_start(self):
        self._val_sum = 0.0
        self._val_n = 0

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self._val_sum += nn.functional.mse_loss(self.model(x), y, reduction="sum")
        self._val_n += y.numel()

    def get_val_metrics(self):
        script = getattr(self, "scripted_metrics", None)
        if script:
            return dict(script[self.epoch])
        return {"loss": (self._val_sum / self._val_n).item()}


@dataclass(kw_only=True, eq=False)
class ToyTrainer(ToySteps, Trainer):
    scripted_metrics: list = field(default_factory=list)


def compose(*mixins):
    """A trainer class made of ``mixins`` over LoopBase, with the toy steps."""
    cls = type("Composed", (ToySteps, *mixins, LoopBase), {"__annotations__": {}})
    return dataclass(kw_only=True, eq=False)(cls)


def trainer_kwargs(tmp_path, **overrides):
    """Keyword arguments for a small, fast run in ``tmp_path``."""
    model = make_model()
    kwargs = dict(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
        train_dataloader=make_loader(),
        val_dataloader=make_loader(shuffle=False, seed=1),
        epochs=2,
        project_dir=str(tmp_path),
        progress_bar=False,
    )
    kwargs.update(overrides)
    return kwargs


def parameters_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_parameters(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"parameter {key} differs"


def assert_bitwise_equal(a, b, path="state") -> None:
    """Nested states (dicts, lists, tensors, NumPy arrays, numbers) equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, f"{path}: dtype differs"
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_bitwise_equal(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise_equal(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), f"{path} differs"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


@pytest.fixture(scope="session", params=["s3", "gcs", "azure"])
def backend(request, tmp_path_factory):
    """A real object-store server for the session, one per backend: a :class:`Backend`."""
    from tests import storage_servers as servers

    port = servers.free_port()
    if request.param == "s3":
        command, made = servers.moto_command(port), servers.s3_backend(port)
    elif request.param == "gcs":
        command, made = servers.gcs_command(port), servers.gcs_backend(port)
    else:
        if shutil.which("node") is None:
            pytest.skip("Azure tests need Node.js for azurite; node is not on PATH")
        command, made = servers.azurite_command(port), servers.azure_backend(port)
        if command is None:
            pytest.fail(
                "azurite is not installed: run `npm install --no-save azurite@3.35.0` in the "
                "repository root, or set AZURITE_BLOB to the azurite-blob binary (tox does)"
            )
    log_dir = str(tmp_path_factory.mktemp(f"{request.param}_server"))
    server = servers.start_server(request.param, command, port, log_dir)
    saved_env = {key: os.environ.get(key) for key in made.env}
    os.environ.update(made.env)
    try:
        yield made
    finally:
        server.stop()
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server alone, for tests that need one remote store, not all three."""
    from tests import storage_servers as servers

    port = servers.free_port()
    log_dir = str(tmp_path_factory.mktemp("s3_only_server"))
    server = servers.start_server("s3", servers.moto_command(port), port, log_dir)
    try:
        yield servers.s3_backend(port)
    finally:
        server.stop()
