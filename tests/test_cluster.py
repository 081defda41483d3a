"""Cluster launch through Hydra's submitit plugin: a SLURM dry run, and a real sweep on
submitit's local executor (the same plugin code path, without a SLURM cluster)."""

from __future__ import annotations

import os
import re

import pytest

from tests.conftest import REPO, run_module

pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="hydra-submitit-launcher")

CONFIG_DIR = os.path.join(REPO, "examples", "digits", "configs")


def hydra_app(*args, cwd):
    return run_module(
        "accel_hydra.hydra_app",
        "--config-dir",
        CONFIG_DIR,
        "--config-name",
        "train",
        *args,
        cwd=cwd,
        env={"PYTHONPATH": REPO},
    )


def test_slurm_launcher_dry_run(tmp_path):
    shown = hydra_app(
        "hydra/launcher=submitit_slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.gpus_per_node=4",
        "hydra.launcher.nodes=2",
        "--cfg",
        "hydra",
        cwd=tmp_path,
    )
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "hydra_submitit_launcher.submitit_launcher.SlurmLauncher" in shown.stdout
    assert "partition: gpu" in shown.stdout and "nodes: 2" in shown.stdout
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()


@pytest.mark.single_env
def test_sweep_through_the_submitit_plugin(tmp_path):
    sweep = tmp_path / "sweep"
    done = hydra_app(
        "-m",
        "hydra/launcher=submitit_local",
        f"hydra.sweep.dir={sweep}",
        "trainer.project_dir=${hydra:runtime.output_dir}",
        "trainer.epochs=2",
        "+trainer.progress_bar=false",
        "optimizer.lr=1e-3,1e-2",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for job, lr in (("0", "0.001"), ("1", "0.01")):
        assert (sweep / job / "checkpoints" / "epoch_2").is_dir()
        assert f"lr: {lr}" in (sweep / job / "config.yaml").read_text()


@pytest.mark.single_env
def test_a_hydra_app_job_resumes_with_the_plain_command(tmp_path):
    sweep = tmp_path / "sweep"
    done = hydra_app(
        "-m",
        f"hydra.sweep.dir={sweep}",
        "trainer.project_dir=${hydra:runtime.output_dir}",
        "trainer.epochs=1",
        "+trainer.progress_bar=false",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"project_dir: {sweep / '0'}" in (sweep / "0" / "config.yaml").read_text()
    resumed = run_module("accel_hydra.train_entry", "--resume", sweep / "0")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    assert re.search(r"epochs completed\s+1\n", resumed.stdout)
