"""Upstream AccelHydra code and configs: what works unchanged, and what stops loudly."""

from __future__ import annotations

import os
import pathlib
from dataclasses import dataclass

import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf

from accel_hydra import TrainLauncher
from accel_hydra.cli import main
from accel_hydra.compat import UpstreamNameError
from accel_hydra.storage import CheckpointNotFoundError
from tests.conftest import ToyTrainer, make_model, trainer_kwargs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS = os.path.join(REPO, "examples", "digits", "configs", "train.yaml")


class UpstreamLauncher(TrainLauncher):
    """A launcher written for upstream: its get_dataloaders would be ignored here."""

    def get_dataloaders(self):
        raise AssertionError("never called")


def test_a_launcher_with_get_dataloaders_fails_at_start_naming_it(tmp_path, capsys):
    code = main(["-c", DIGITS, "-l", "tests.test_compat.UpstreamLauncher"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0
    assert "UpstreamLauncher.get_dataloaders" in err
    assert "build_dataloaders(self, config)" in err


def test_a_trainer_with_an_upstream_loop_method_fails_at_construction(tmp_path):
    @dataclass(kw_only=True, eq=False)
    class UpstreamTrainer(ToyTrainer):
        def train_loop(self):
            raise AssertionError("never called")

    with pytest.raises(UpstreamNameError, match=r"UpstreamTrainer.train_loop .* never calls"):
        UpstreamTrainer(**trainer_kwargs(tmp_path))


def test_metric_monitor_imports_from_upstreams_path():
    from accel_hydra.trainer import MetricMonitor

    monitor = MetricMonitor(metric_name="accuracy", mode="max")
    assert monitor({"accuracy": 0.5}) is True


def test_an_upstream_logging_config_node_names_report_to_and_log_dir(tmp_path, capsys):
    code = main(
        [
            "-c",
            DIGITS,
            "-o",
            f"trainer.project_dir={tmp_path}",
            "+trainer.logging_config._target_=accel_hydra.trainer.LoggingConfig",
            "+trainer.logging_config.report_to=tensorboard",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0
    assert "trainer.logging_config" in err and "report_to" in err and "log_dir" in err


def test_project_dir_works_as_a_path_and_as_a_string(tmp_path):
    for given in (str(tmp_path / "a"), tmp_path / "b"):
        trainer = ToyTrainer(**trainer_kwargs(tmp_path, project_dir=given, epochs=1))
        trainer.train(seed=0)
        assert trainer.project_dir / "x" == pathlib.Path(given) / "x"
        assert (trainer.project_dir / "checkpoints").is_dir()
        assert trainer.project_dir.exists()
        assert os.path.join(trainer.project_dir, "x") == os.path.join(str(given), "x")
        assert isinstance(trainer.project_dir, str) and str(trainer.project_dir) == str(given)


def test_len_and_multiply_resolvers_are_registered(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text(
        "devices: [0, 1, 2]\nper_device: 8\nbatch: ${multiply:${per_device},${len:${devices}}}\n"
    )
    loaded = TrainLauncher(str(config)).load_config()
    assert OmegaConf.to_container(loaded, resolve=True)["batch"] == 24


def test_resuming_an_upstream_checkpoint_says_what_it_is_and_how_to_load_it(tmp_path):
    upstream = tmp_path / "upstream" / "checkpoints" / "epoch_3"
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(make_model())
    accelerator.save_state(str(upstream))
    trainer = ToyTrainer(**trainer_kwargs(tmp_path / "run", resume_from_checkpoint=str(upstream)))
    with pytest.raises(CheckpointNotFoundError) as raised:
        trainer.train(seed=0)
    message = str(raised.value)
    assert "upstream AccelHydra or plain Accelerate checkpoint" in message
    assert f"init_from={upstream}" in message
    assert model is not None and torch.is_tensor(next(model.parameters()))


def test_a_model_importing_an_upstream_module_names_it_and_its_replacement(
    tmp_path, monkeypatch, capsys
):
    (tmp_path / "upstream_model.py").write_text(
        "from accel_hydra.models import CountParamsBase\n\n\nclass Model(CountParamsBase):\n"
        "    pass\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["-c", DIGITS, "-o", "model._target_=upstream_model.Model"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "accel_hydra.models is an upstream AccelHydra module" in err
    assert "torch.nn.Module" in err


def test_upstreams_launcher_path_still_names_the_launcher():
    from accel_hydra.cli import _launcher_class

    assert _launcher_class("accel_hydra.train_launcher.TrainLauncher") is TrainLauncher
