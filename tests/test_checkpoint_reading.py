"""The loop reads Accelerate's checkpoint layout itself: each file once, parsed while its
checksum is computed, and applied only when every checksum matched. What it loads must
be exactly what ``accelerator.load_state`` loads."""

from __future__ import annotations

import builtins
import os
import random
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from torch import nn

from accel_hydra.checkpoint_reading import apply_checkpoint, read_checkpoint, reads_exactly
from accel_hydra.storage import CheckpointCorruptError
from tests.conftest import (
    ToyTrainer,
    assert_bitwise_equal,
    make_model,
    parameters_of,
    trainer_kwargs,
)


class Tied(nn.Module):
    """Input and output embeddings share one weight: safetensors stores it once."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.hidden = nn.Linear(6, 6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.embed.weight


def prepared(models: int, seed: int) -> tuple[Accelerator, list, list, list]:
    """An accelerator with ``models`` models, each with an AdamW and a LinearLR."""
    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    nets = [Tied() if i == 0 else make_model() for i in range(models)]
    optimizers = [torch.optim.AdamW(n.parameters(), lr=0.01) for n in nets]
    schedulers = [torch.optim.lr_scheduler.LinearLR(o, total_iters=10) for o in optimizers]
    objects = accelerator.prepare(*nets, *optimizers, *schedulers)
    return (
        accelerator,
        list(objects[:models]),
        list(objects[models : 2 * models]),
        list(objects[2 * models :]),
    )


def loss_of(model) -> torch.Tensor:
    if isinstance(model, Tied):
        tokens = torch.randint(0, 10, (4,))
        return model.out(model.hidden(model.embed(tokens))).square().mean()
    return model(torch.randn(4, 4)).square().mean()


def train_a_little(models, optimizers, schedulers) -> None:
    for model, optimizer, scheduler in zip(models, optimizers, schedulers, strict=True):
        for _ in range(3):
            loss_of(model).backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()


def everything(accelerator, models, optimizers, schedulers) -> dict:
    """The whole state a load sets, for comparison."""
    return {
        "models": [{k: v.clone() for k, v in m.state_dict().items()} for m in models],
        "optimizers": [o.state_dict() for o in optimizers],
        "schedulers": [s.state_dict() for s in schedulers],
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "step": accelerator.step,
    }


@pytest.mark.parametrize("models", [1, 2])
@pytest.mark.parametrize("safe_serialization", [True, False])
def test_reading_the_layout_ourselves_loads_what_load_state_loads(
    tmp_path, fresh_accelerate_state, models, safe_serialization
):
    accelerator, nets, optimizers, schedulers = prepared(models, seed=0)
    train_a_little(nets, optimizers, schedulers)
    accelerator.step = 7
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    accelerator.save_state(str(tmp_path / "ckpt"), safe_serialization=safe_serialization)

    results = []
    for loader in ("load_state", "ours"):
        accelerator, nets, optimizers, schedulers = prepared(models, seed=1)
        random.seed(9), np.random.seed(9), torch.manual_seed(9)  # moved on since the save
        directory = str(tmp_path / "ckpt")
        if loader == "load_state":
            accelerator.load_state(directory)
        else:
            assert reads_exactly(accelerator, directory) is None
            apply_checkpoint(accelerator, read_checkpoint(accelerator, directory))
        results.append(everything(accelerator, nets, optimizers, schedulers))
        accelerator.free_memory()
    assert_bitwise_equal(results[1], results[0])
    # The tied weight is one tensor again after the load, as the model built it.
    tied = nets[0]
    assert tied.out.weight.data_ptr() == tied.embed.weight.data_ptr()


def test_other_layouts_are_left_to_load_state(tmp_path, fresh_accelerate_state):
    accelerator, nets, optimizers, schedulers = prepared(1, seed=0)
    accelerator.save_state(str(tmp_path / "plain"))
    assert reads_exactly(accelerator, str(tmp_path / "plain")) is None
    (tmp_path / "plain" / "custom_checkpoint_0.pkl").write_bytes(b"")
    assert "custom_checkpoint" in reads_exactly(accelerator, str(tmp_path / "plain"))
    accelerator.register_load_state_pre_hook(lambda models, directory: None)
    assert "pre-hook" in reads_exactly(accelerator, str(tmp_path / "plain"))


def count_opens(monkeypatch) -> Counter:
    """Count every Python-level open() of a file, by file name."""
    opened: Counter = Counter()
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        if isinstance(file, (str, os.PathLike)):
            opened[os.path.basename(os.fspath(file))] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    return opened


def fresh_toy(tmp_path, **overrides) -> ToyTrainer:
    torch.manual_seed(0)
    model = make_model()
    kwargs = trainer_kwargs(
        tmp_path, model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=0.01)
    )
    kwargs.update(report_to=None, **overrides)
    return ToyTrainer(**kwargs)


def test_a_resume_reads_each_pickled_file_once_besides_its_checksum(tmp_path, monkeypatch):
    fresh_toy(tmp_path, epochs=1).train(seed=0)
    opened = count_opens(monkeypatch)
    resumed = fresh_toy(tmp_path, epochs=1, resume_from_checkpoint="latest")
    resumed.train(seed=0)
    assert resumed.resumed_from == "epoch_1"
    # One open to compute its checksum, one to load it: before, a third walked its
    # pickle for code first (torch.load with mmap), then load_state opened it again.
    assert opened["optimizer.bin"] == 2
    assert opened["random_states_0.pkl"] == 2


def test_a_damaged_checkpoint_changes_nothing_in_the_run(tmp_path):
    fresh_toy(tmp_path, epochs=1).train(seed=0)
    folder = tmp_path / "checkpoints" / "epoch_1"
    # Damage a tensor's bytes, not its pickle: the file still parses, and the
    # optimizer state and weights would load; only the checksum tells.
    path = folder / "optimizer.bin"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    before_dir = tmp_path / "copy"
    shutil.copytree(folder, before_dir)

    resumed = fresh_toy(tmp_path / "second", epochs=1, resume_from_checkpoint=str(folder))
    initial = {k: v.clone() for k, v in parameters_of(resumed.model).items()}
    with pytest.raises(CheckpointCorruptError, match="optimizer.bin does not match its checksum"):
        resumed.train(seed=0)
    for name, value in parameters_of(resumed.model).items():
        assert torch.equal(value, initial[name]), f"{name} changed by a refused checkpoint"
    assert not resumed.optimizer.state_dict()["state"], "optimizer state loaded"


@pytest.mark.single_env
@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_two_processes_skip_a_checkpoint_damaged_in_one_process_file_together(tmp_path):
    """Process 0 checks the checksums while each process parses its own RNG file: a
    damaged ``random_states_1.pkl`` must make both skip the checkpoint, not one."""
    from tests.test_resume import assert_bitwise_equal, torchrun_harness

    args = ["--epochs", 2, "--save-every", 2]
    full = torchrun_harness(tmp_path / "full", tmp_path / "full.pt", *args)
    assert full.returncode == 0, full.stderr[-3000:]
    stopped = torchrun_harness(
        tmp_path / "run", tmp_path / "unused.pt", *args, "--signal-at", "train:1:3"
    )
    assert stopped.returncode != 0
    checkpoints = tmp_path / "run" / "checkpoints"
    newest = max(
        (p for p in checkpoints.iterdir() if p.name.startswith("step_")),
        key=lambda p: int(p.name.split("_")[1]),
    )
    path = newest / "random_states_1.pkl"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    resumed = torchrun_harness(
        tmp_path / "run", tmp_path / "result.pt", *args, "--resume", "latest"
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"skipping {newest.name}: " in resumed.stdout
    assert "random_states_1.pkl does not match its checksum" in resumed.stdout
    assert "resumed from" in resumed.stdout
    assert_bitwise_equal(tmp_path / "result.pt", tmp_path / "full.pt")
