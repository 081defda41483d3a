import os

import pytest
import torch

from accel_hydra import CheckpointMixin, MetricMonitor
from accel_hydra.storage import MARKER, CheckpointNotFoundError, CheckpointStore
from tests.conftest import (
    ToyTrainer,
    assert_same_parameters,
    compose,
    make_model,
    parameters_of,
    trainer_kwargs,
)

Checkpointed = compose(CheckpointMixin)


def fresh_kwargs(tmp_path, **overrides):
    """Identical starting weights for every run of a test."""
    torch.manual_seed(0)
    model = make_model(dropout=0.2)
    kwargs = trainer_kwargs(
        tmp_path,
        model=model,
        optimizer=torch.optim.AdamW(model.parameters(), lr=0.01),
    )
    kwargs.update(overrides)
    return kwargs


def test_save_last_k_keeps_k_committed_plus_best(tmp_path):
    trainer = ToyTrainer(
        **fresh_kwargs(tmp_path, epochs=5),
        save_every_n_steps=5,
        save_last_k=3,
        metric_monitor=MetricMonitor(metric_name="loss"),
        report_to=None,
    )
    trainer.train(seed=0)
    committed = CheckpointStore(trainer.checkpoint_dir).committed()
    assert sorted(committed) == ["best", "epoch_5", "step_55", "step_60"]
    assert sorted(os.listdir(trainer.checkpoint_dir)) == sorted(committed)


def test_best_holds_the_parameters_of_the_best_epoch(tmp_path):
    trainer = ToyTrainer(
        **fresh_kwargs(tmp_path, epochs=4),
        metric_monitor=MetricMonitor(metric_name="loss"),
        report_to=None,
    )
    trainer.scripted_metrics = [{"loss": v} for v in (0.9, 0.3, 0.5, 0.4)]
    at_epoch_end = {}
    trainer.on_train_epoch_end = lambda: at_epoch_end.setdefault(
        trainer.epoch, parameters_of(trainer.model)
    )
    trainer.train(seed=0)
    assert trainer.best_checkpoint == os.path.join(trainer.checkpoint_dir, "best")

    restored = ToyTrainer(
        **fresh_kwargs(tmp_path / "other", epochs=4),
        resume_from_checkpoint=trainer.best_checkpoint,
        report_to=None,
    )
    restored.epochs = 0  # load only
    restored.train(seed=0)
    assert restored.epoch == 2
    assert_same_parameters(parameters_of(restored.model), at_epoch_end[2])
    with pytest.raises(AssertionError):
        assert_same_parameters(parameters_of(restored.model), at_epoch_end[4])


def test_unmarked_directory_is_ignored_by_resume_and_pruning(tmp_path):
    trainer = Checkpointed(**fresh_kwargs(tmp_path, epochs=2), save_last_k=1)
    trainer.train(seed=0)
    ckpt = trainer.checkpoint_dir
    # A newer save that died before its marker: same files, no marker.
    os.makedirs(f"{ckpt}/step_999")
    with open(f"{ckpt}/step_999/model.safetensors", "wb") as f:
        f.write(b"half a file")

    resumed = Checkpointed(
        **fresh_kwargs(tmp_path, epochs=3), resume_from_checkpoint="latest", save_last_k=1
    )
    resumed.train(seed=0)
    assert resumed.resumed_from == "epoch_2"
    assert resumed.epoch == 3
    committed = CheckpointStore(ckpt).committed()
    assert sorted(committed) == ["epoch_2", "epoch_3"]  # the resumed-from one is protected
    assert os.path.exists(f"{ckpt}/step_999/model.safetensors")


def test_resume_from_missing_path_names_the_path(tmp_path):
    missing = str(tmp_path / "nowhere" / "step_10")
    trainer = Checkpointed(**fresh_kwargs(tmp_path), resume_from_checkpoint=missing)
    with pytest.raises(CheckpointNotFoundError, match=f"{missing} does not exist"):
        trainer.train(seed=0)


def test_resume_from_uncommitted_checkpoint_is_refused(tmp_path):
    os.makedirs(tmp_path / "checkpoints" / "step_3")
    trainer = Checkpointed(**fresh_kwargs(tmp_path), resume_from_checkpoint="step_3")
    with pytest.raises(CheckpointNotFoundError, match="step_3 has no commit marker"):
        trainer.train(seed=0)


def test_latest_in_a_fresh_directory_starts_from_scratch(tmp_path, capsys):
    trainer = Checkpointed(**fresh_kwargs(tmp_path), resume_from_checkpoint="latest")
    trainer.train(seed=0)
    assert "no committed checkpoint" in capsys.readouterr().out
    assert trainer.epoch == 2


def uninterrupted(tmp_path, **overrides):
    trainer = ToyTrainer(**fresh_kwargs(tmp_path / "full", **overrides), report_to=None)
    trainer.train(seed=0)
    return trainer


@pytest.mark.parametrize("accumulation", [1, 3])
def test_mid_epoch_resume_matches_uninterrupted_run(tmp_path, accumulation):
    common = dict(epochs=3, gradient_accumulation_steps=accumulation)
    reference = uninterrupted(tmp_path, **common)

    first = ToyTrainer(
        **fresh_kwargs(tmp_path / "run", **common),
        save_every_n_steps=2,
        save_last_k=None,
        report_to=None,
    )
    first.epochs = 2  # stop early, as a killed run would (its last step checkpoint is mid-epoch)
    first.train(seed=0)

    second = ToyTrainer(
        **fresh_kwargs(tmp_path / "run", **common),
        save_every_n_steps=2,
        resume_from_checkpoint="step_10" if accumulation == 1 else "step_6",
        report_to=None,
    )
    second.train(seed=0)
    assert second.step == reference.step
    assert_same_parameters(parameters_of(second.model), parameters_of(reference.model))
    for a, b in zip(
        second.optimizer.state_dict()["state"].values(),
        reference.optimizer.state_dict()["state"].values(),
        strict=True,
    ):
        for key in a:
            assert torch.equal(a[key], b[key])


def test_resuming_a_finished_run_does_nothing(tmp_path):
    trainer = Checkpointed(**fresh_kwargs(tmp_path))
    trainer.train(seed=0)
    done = parameters_of(trainer.model)
    again = Checkpointed(**fresh_kwargs(tmp_path), resume_from_checkpoint="latest")
    again.train(seed=0)
    assert again.step == trainer.step
    assert_same_parameters(parameters_of(again.model), done)


def test_marker_is_the_last_file_written(tmp_path):
    trainer = Checkpointed(**fresh_kwargs(tmp_path, epochs=1))
    trainer.train(seed=0)
    folder = f"{trainer.checkpoint_dir}/epoch_1"
    times = {name: os.stat(f"{folder}/{name}").st_mtime_ns for name in os.listdir(folder)}
    assert max(times, key=times.get) == MARKER


def test_checkpoint_objects_are_saved_and_restored(tmp_path):
    class Counter:
        def __init__(self):
            self.value = 0

        def state_dict(self):
            return {"value": self.value}

        def load_state_dict(self, state):
            self.value = state["value"]

    counter = Counter()

    class WithCounter(Checkpointed):
        @property
        def checkpoint_objects(self):
            return [counter]

        def on_train_epoch_start(self):
            counter.value += 10

    WithCounter(**fresh_kwargs(tmp_path)).train(seed=0)
    counter.value = -1
    resumed = WithCounter(**fresh_kwargs(tmp_path), resume_from_checkpoint="latest")
    resumed.epochs = 2
    resumed.train(seed=0)
    assert counter.value == 20


class RecordingDataset(torch.utils.data.Dataset):
    """Regression data that records which indices the data pipeline loaded."""

    def __init__(self):
        from tests.conftest import regression_data

        self.data = regression_data(96)
        self.loaded = []

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        self.loaded.append(index)
        return self.data[index]


def test_mid_epoch_resume_skips_by_index_without_loading(tmp_path):
    def run(**overrides):
        dataset = RecordingDataset()
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)
        trainer = Checkpointed(
            **fresh_kwargs(tmp_path, epochs=2, train_dataloader=loader),
            save_every_n_steps=5,
            save_last_k=None,
            **overrides,
        )
        trainer.train(seed=0)
        return dataset.loaded

    everything = run()
    resumed = run(resume_from_checkpoint="step_20")  # epoch 2, after 8 of its 12 batches
    epoch_two = everything[96:]
    assert resumed == epoch_two[8 * 8 :]


def test_resume_without_a_seed_still_shuffles_like_the_original(tmp_path):
    def run(process_seed, **overrides):
        dataset = RecordingDataset()
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True)
        trainer = Checkpointed(
            **fresh_kwargs(tmp_path, epochs=2, train_dataloader=loader),
            save_every_n_steps=5,
            save_last_k=None,
            **overrides,
        )
        torch.manual_seed(process_seed)  # as a new process would start with its own seed
        trainer.train()  # no seed given
        return dataset.loaded

    everything = run(process_seed=11)
    resumed = run(
        process_seed=22, resume_from_checkpoint="step_15"
    )  # epoch 2, after 3 of its 12 batches
    assert resumed == everything[96 + 3 * 8 :]
