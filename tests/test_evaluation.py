"""Evaluating without training: validate(checkpoint), test(loader), predict(loader).

A checkpoint's metrics are what a user compares: ``validate("best")`` must give back,
bit for bit, the metrics ``best`` was saved with, from a fresh trainer as well as from
the one that trained, on a local or an S3 checkpoint. An evaluation must not leave a
trace (files, run lock) or change what a later ``train()`` does.
"""

from __future__ import annotations

import collections
import json
import os

import pytest
import torch
from torch.utils.data import DataLoader

from accel_hydra import MetricMonitor
from accel_hydra.evaluation import concatenate_outputs
from accel_hydra.storage import CheckpointNotFoundError
from tests.conftest import (
    ToyTrainer,
    compose,
    make_loader,
    make_model,
    parameters_of,
    trainer_kwargs,
)
from tests.test_distributed import TORCHRUN, ranks, torchrun

STATE_FILE = "accel_hydra_trainer_state.json"


def trained(tmp_path, **overrides):
    """A 3-epoch toy run whose best epoch (2) is not its last: a test that got the
    current weights instead of best's would see other metrics. Seeded before the model
    is built: its initial weights decide which epoch is best."""
    torch.manual_seed(0)
    kwargs = trainer_kwargs(
        tmp_path, epochs=3, metric_monitor=MetricMonitor(metric_name="loss"), report_to=None
    )
    kwargs.update(overrides)
    trainer = ToyTrainer(**kwargs)
    trainer.train(seed=0)
    return trainer


def saved_metrics(checkpoint_dir) -> dict:
    with open(os.path.join(checkpoint_dir, STATE_FILE)) as f:
        return json.load(f)["val_metrics"]


def fresh_accelerate():
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def tree(root) -> dict:
    """Every file and directory below ``root`` with its size and modification time."""
    found = {}
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(parent, name)
            info = os.stat(path)
            found[os.path.relpath(path, root)] = (info.st_size, info.st_mtime_ns)
    return found


def test_validate_best_gives_back_the_metrics_best_was_saved_with(tmp_path):
    run = trained(tmp_path / "run")
    best = saved_metrics(tmp_path / "run" / "checkpoints" / "best")
    assert best != run.val_metrics  # the last epoch is not the best one
    assert run.validate(checkpoint="best") == best  # after train(), bitwise

    fresh_accelerate()
    # A new trainer that never trained, with other initial weights.
    torch.manual_seed(123)
    before = tree(tmp_path / "run")
    other = ToyTrainer(**trainer_kwargs(tmp_path / "run", report_to=None))
    assert other.validate() != best  # its own random weights
    assert other.validate(checkpoint="best") == best
    assert other.validate(checkpoint="epoch_3") == saved_metrics(
        tmp_path / "run" / "checkpoints" / "epoch_3"
    )
    path = str(tmp_path / "run" / "checkpoints" / "best")
    assert other.validate(checkpoint=path) == best
    # The weights stay loaded (documented); nothing was written, no lock left behind.
    assert other.validate() == saved_metrics(tmp_path / "run" / "checkpoints" / "best")
    assert tree(tmp_path / "run") == before
    assert other.val_metrics == {}


def test_validate_a_checkpoint_on_s3(tmp_path, s3):
    url = s3.new_bucket() + "/run"
    run = trained(tmp_path / "run", checkpoint_dir=url, storage_options=s3.storage_options)
    best_loss = run.metric_monitor.best_value
    fresh_accelerate()
    other = ToyTrainer(
        **trainer_kwargs(tmp_path / "other", report_to=None, storage_options=s3.storage_options)
    )
    assert other.validate(checkpoint=f"{url}/best") == {"loss": best_loss}
    assert not os.path.exists(tmp_path / "other")


def test_a_missing_checkpoint_is_one_line_listing_the_committed_ones(tmp_path):
    trained(tmp_path, epochs=2)
    fresh_accelerate()
    trainer = ToyTrainer(**trainer_kwargs(tmp_path, report_to=None))
    with pytest.raises(CheckpointNotFoundError) as caught:
        trainer.validate(checkpoint="step_7")
    message = str(caught.value)
    assert "\n" not in message
    assert "step_7 does not exist" in message
    assert "committed in" in message and "best" in message and "epoch_2" in message


def test_latest_in_an_empty_checkpoint_dir_says_so(tmp_path):
    trainer = ToyTrainer(**trainer_kwargs(tmp_path, report_to=None))
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint in"):
        trainer.validate(checkpoint="latest")


def test_a_loop_without_checkpoints_validates_current_weights_only(tmp_path):
    trainer = compose()(**trainer_kwargs(tmp_path))
    metrics = trainer.validate()
    assert set(metrics) == {"loss"}
    with pytest.raises(ValueError) as caught:
        trainer.validate(checkpoint="best")
    assert "\n" not in str(caught.value) and "CheckpointMixin" in str(caught.value)


def test_evaluating_first_changes_nothing_a_later_train_does(tmp_path):
    """Evaluations draw from the random generators (a data iterator takes a seed from
    them) and prepare the model; train() without a seed, with dropout, must still
    give the parameters of a trainer that never evaluated, bit for bit."""

    def run(evaluate_first):
        fresh_accelerate()
        torch.manual_seed(0)
        model = make_model(dropout=0.2)
        kwargs = trainer_kwargs(
            tmp_path / str(evaluate_first),
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.05),
            val_dataloader=make_loader(shuffle=True, seed=1),
            report_to=None,
        )
        trainer = ToyTrainer(**kwargs)
        if evaluate_first:
            trainer.validate()
            trainer.test(make_loader(n=20, shuffle=True, seed=2))
            data = torch.randn(10, 4, generator=torch.Generator().manual_seed(3))
            trainer.predict(DataLoader(data, batch_size=4, shuffle=True))
        trainer.train()
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        return parameters_of(unwrapped), sorted(os.listdir(tmp_path / str(evaluate_first)))

    evaluated, files_evaluated = run(True)
    plain, files_plain = run(False)
    assert evaluated.keys() == plain.keys()
    for key in plain:
        assert torch.equal(evaluated[key], plain[key]), key
    assert files_evaluated == files_plain


def test_test_and_predict_on_one_process(tmp_path):
    trainer = ToyTrainer(**trainer_kwargs(tmp_path, report_to=None))
    assert trainer.test(make_loader(shuffle=False, seed=1)) == trainer.validate()

    pair = collections.namedtuple("Pair", "x y")

    def predict_step(batch, batch_idx):
        x, y = batch
        return {"prediction": trainer.model(x), "pair": pair(x, y), "index": [batch_idx]}

    trainer.predict_step = predict_step
    data = make_loader(n=13, batch_size=4, shuffle=False)
    out = trainer.predict(data)
    x, y = data.dataset.tensors
    assert torch.equal(out["pair"].x, x) and torch.equal(out["pair"].y, y)
    assert isinstance(out["pair"], pair)
    torch.testing.assert_close(out["prediction"], trainer.model(x).detach())
    assert out["index"] == [0, 1, 2, 3]
    assert out["prediction"].device.type == "cpu"
    assert trainer.model.training  # its mode is put back


def test_concatenate_outputs_refuses_changing_structures():
    assert concatenate_outputs([]) is None
    assert concatenate_outputs([["a"], ["b", "c"]]) == ["a", "b", "c"]
    joined = concatenate_outputs(
        [(torch.ones(2), [torch.zeros(1)]), (torch.ones(1), [torch.zeros(2)])]
    )
    assert joined[0].shape == (3,) and joined[1][0].shape == (3,)
    with pytest.raises(TypeError, match="different keys"):
        concatenate_outputs([{"a": torch.ones(1)}, {"b": torch.ones(1)}])


@pytest.mark.skipif(not os.path.exists(TORCHRUN), reason="needs torchrun")
def test_predict_on_two_processes_returns_the_dataset_once_in_order(tmp_path):
    """37 samples: the last batch of each loader is padded by Accelerate (before train()
    with batches of 4, after it with batches of 8 and an odd number of batches), and
    the trainer itself runs with even_batches=False."""
    result = torchrun(2, "predict", tmp_path / "out", tmp_path / "p", "--epochs", 1, "--uneven")
    assert result.returncode == 0, result.stderr[-3000:]
    for seen in ranks(tmp_path / "out", "predict"):
        for phase in ("before_train", "after_train"):
            assert seen[phase]["index"] == list(range(37)), phase
            assert seen[phase]["outputs_match_the_model"], phase
            assert seen[phase]["pair_rows"] == 37, phase
    rank0, rank1 = ranks(tmp_path / "out", "predict")
    assert rank0["metrics"] == rank1["metrics"]
    # Training after predict() ran in DDP: the ranks' parameters agree.
    assert rank0["after_train"]["parameter_sum"] == rank1["after_train"]["parameter_sum"]
