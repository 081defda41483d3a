"""init_from / init_strict: another run's weights, then a fresh start."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from torch import nn

from accel_hydra.init_weights import InitFromError
from tests.conftest import ToyTrainer, make_model, parameters_of, trainer_kwargs


def upstream_checkpoint(path, safe=True):
    """What upstream AccelHydra writes: a plain Accelerate save_state directory."""
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(123)
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.save_state(str(path), safe_serialization=safe)
    return parameters_of(model)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "pytorch_model.bin"])
def test_init_from_an_upstream_accelerate_directory(tmp_path, safe):
    source = upstream_checkpoint(tmp_path / "upstream" / "epoch_3", safe=safe)
    trainer = ToyTrainer(
        **trainer_kwargs(
            tmp_path / "run", epochs=0, init_from=str(tmp_path / "upstream" / "epoch_3")
        )
    )
    trainer.train(seed=0)
    loaded = parameters_of(trainer.model)
    for key, value in source.items():
        assert torch.equal(loaded[key], value), key
    assert trainer.step == 0 and trainer.epoch == 0


def test_init_from_one_of_our_checkpoints_trains_fresh(tmp_path):
    first = ToyTrainer(**trainer_kwargs(tmp_path / "first", epochs=1))
    first.train(seed=0)
    checkpoint = tmp_path / "first" / "checkpoints" / "epoch_1"
    assert checkpoint.is_dir()
    trained = parameters_of(first.model)
    second = ToyTrainer(**trainer_kwargs(tmp_path / "second", epochs=0, init_from=str(checkpoint)))
    second.train(seed=0)
    for key, value in trained.items():
        assert torch.equal(parameters_of(second.model)[key], value), key
    third = ToyTrainer(**trainer_kwargs(tmp_path / "third", epochs=1, init_from=str(checkpoint)))
    third.train(seed=0)
    assert third.step == first.step  # one fresh epoch, not a resumed count


def test_a_shape_mismatch_with_init_strict_is_one_clear_line(tmp_path):
    upstream_checkpoint(tmp_path / "ckpt")
    narrow = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.0), nn.Linear(8, 1))
    kwargs = trainer_kwargs(tmp_path / "run", epochs=0, init_from=str(tmp_path / "ckpt"))
    kwargs.update(model=narrow, optimizer=torch.optim.SGD(narrow.parameters(), lr=0.1))
    with pytest.raises(InitFromError) as raised:
        ToyTrainer(**kwargs).train(seed=0)
    message = str(raised.value)
    assert "\n" not in message
    assert "3 shape mismatch: 0.bias [16] vs model [8], 0.weight [16, 4] vs model [8, 4]" in message
    assert "init_strict=false" in message


def test_init_strict_false_loads_what_fits_and_lists_the_rest_once(tmp_path, capsys):
    source = upstream_checkpoint(tmp_path / "ckpt")
    wider = nn.Sequential(
        nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.0), nn.Linear(16, 2), nn.Linear(2, 1)
    )
    kwargs = trainer_kwargs(
        tmp_path / "run", epochs=0, init_from=str(tmp_path / "ckpt"), init_strict=False
    )
    kwargs.update(model=wider, optimizer=torch.optim.SGD(wider.parameters(), lr=0.1))
    trainer = ToyTrainer(**kwargs)
    trainer.train(seed=0)
    assert torch.equal(trainer.model.state_dict()["0.weight"], source["0.weight"])
    out = capsys.readouterr().out
    assert out.count("init_from: skipped 2 shape mismatch: 3.bias [1] vs model [2]") == 1
    assert out.count("init_from: skipped 2 missing in the checkpoint: 4.bias, 4.weight") == 1
